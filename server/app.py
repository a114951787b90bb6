"""The Starlette application: routes, the engine's lifetime, the access log.

Request flow (one direction): guard middleware (`security`) -> body -> typed request
(`schemas`) -> prompt ids (the tokenizer's chat format) -> `engine.submit` -> one JSON body, or
an event stream (`streaming`). Every error is rendered by `errors`; the server never touches an
MLX array (the engine's thread owns them all).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlx_mistral.disk_cache import warm_system_prompt
from mlx_mistral.engine import Engine, EngineConfig

from .anthropic_writer import ROUTES as anthropic_routes
from .config import ServerConfig, prompt_cache_settings
from .errors import EXCEPTION_HANDLERS
from .handling import STATS_KEY, ServerState, guarded, state_of
from .metrics import ServerMetrics, metrics_endpoint
from .ollama import ollama_routes
from .openai_routes import openai_routes
from .openapi import openapi_json
from .response_store import ResponseStore
from .responses import ResponsesAPI
from .schemas import (
    LogprobFormatter,
)
from .security import build_middleware, is_authenticated
from .status import status
from .streaming import Served
from .ui import ui_routes

log = logging.getLogger("mlx_mistral.server")
access_log = logging.getLogger("mlx_mistral.server.access")


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


@guarded
async def health(request: Request) -> Response:
    state = state_of(request)
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
            "dtype": engine.slot.compute_dtype,
            "memory": engine.slot.memory_usage(),
            "responses_store": request.app.state.responses_store.usage(),
            "unloads_at": None if unloads_at is None else iso_time(unloads_at),
        }
    )


def iso_time(timestamp: float) -> str:
    """A time.time() as ISO 8601 in UTC, as Ollama writes its `expires_at`."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


# -- access log -------------------------------------------------------------------------------
def log_safe(text: str) -> str:
    """`text` with every byte outside printable ASCII, and the quote and backslash, as `\\xHH`,
    as nginx writes its access log: a decoded path such as `/a%0aFORGED` cannot start a line of
    its own, nor `%1b[2J` clear the terminal of someone tailing the log."""
    raw = text.encode("utf-8", "surrogateescape")
    return "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02X}" for b in raw)


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
                f'{client[0]}:{client[1]} "{log_safe(scope["method"])} {log_safe(scope["path"])}"',
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

                loader = functools.partial(load_checkpoint, config.model, dtype=config.dtype)
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
            speculation=config.speculation,
            keep_alive=config.keep_alive_seconds,
            max_memory_bytes=config.max_memory_bytes,
        ),
    )
    engine.start()
    log.info(
        "model %s loaded in %.1fs, computing in %s",
        config.model_name,
        time.perf_counter() - started,
        engine.slot.compute_dtype,
    )
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
    responses_store = ResponseStore(config.responses_store_bytes)
    routes = [
        *(ui_routes() if config.ui else ()),  # before Ollama's `GET /`: a browser gets the page
        Route("/v1/status", status, methods=["GET"]),
        *openai_routes(),
        *ResponsesAPI(responses_store).routes(),
        *anthropic_routes,
        *ollama_routes(),
        Route("/health", health, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
    ]
    if config.metrics_enabled:
        routes.append(Route("/metrics", metrics_endpoint, methods=["GET"]))
    middleware = [Middleware(AccessLog), *build_middleware(config)]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=_lifespan(state, load),
        exception_handlers=EXCEPTION_HANDLERS,
    )  # type: ignore[arg-type]
    app.state.server = state
    app.state.responses_store = responses_store
    app.state.metrics = ServerMetrics(lambda: state.engine, routes)
    app.state.metrics.gauge(
        "responses_store_bytes",
        "Bytes of kept Responses (bounded by --responses-store-size).",
        lambda: responses_store.nbytes,
    )
    return app
