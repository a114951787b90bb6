"""What every endpoint's handler shares: the server's state, the error guard, the body, the
chat prompt, and running one planned generation.

A dialect's module (`openai_routes`, `responses`, `anthropic_writer`, `ollama`) turns its
request into a `RequestPlan` with these pieces and hands it to `run_plan`; `app` only assembles
the routes, the middleware and the engine's lifetime.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from mlx_mistral.chat import ChatPrompt, encode_chat_prompt
from mlx_mistral.engine import Engine
from mlx_mistral.errors import (
    EngineDeadError,
    EngineOverloadedError,
    MistralError,
    ModelNotFoundError,
)
from mlx_mistral.sampling.params import SamplingParams
from mlx_mistral.tokenizer import PromptBudget, Tokenizer
from mlx_mistral.tools.grammar import GrammarConstraint, make_constraints

from .config import ServerConfig
from .errors import dialect_of, error_response, handle_unexpected
from .event_stream import EventStreamResponse
from .schemas import (
    ChatCompletionRequest,
    check_content_type,
    parse_body,
)
from .streaming import ResponseWriter, Served, with_keepalive

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
        """`fit_to_window`'s params."""
        return self.fit_to_window(params, given, prompt_len)[0]

    def fit_to_window(
        self, params: SamplingParams, given: bool, prompt_len: int
    ) -> tuple[SamplingParams, bool]:
        """Every dialect's max_tokens against the context window: the request's (`given`), or
        the server's default, lowered to the room the prompt leaves; (params, whether a given
        max_tokens was lowered). Clients send a ceiling (Continue 4096, Claude Code 32000), not
        a demand: the answer ends with "length" where the window does. A prompt that alone
        fills the window is left to the engine, which names it (context_length_exceeded)."""
        context = None if self.engine is None else self.engine.context_length
        wanted = params.max_tokens if given else self.config.default_max_tokens
        if context is None or wanted is None or context - prompt_len <= 0:
            return params, False
        fitted = min(wanted, context - prompt_len)
        if fitted == params.max_tokens:
            return params, False
        return dataclasses.replace(params, max_tokens=fitted), given

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


def state_of(request: Request) -> ServerState:
    return request.app.state.server


def stats_of(request: Request) -> dict[str, Any]:
    return request.scope.setdefault(STATS_KEY, {"start": time.perf_counter()})


async def read_json(request: Request) -> dict[str, Any]:
    check_content_type(request.headers.get("content-type"))
    return parse_body(await request.body())


def tool_call_ids(
    parses_tool_calls: bool, constraints: Sequence[GrammarConstraint] | None
) -> list[tuple[str, ...]] | None:
    """Per choice, the call ids its grammar forces (what the writer reads tool calls with); None
    when the answer holds no tool calls to read."""
    if not (parses_tool_calls and constraints):
        return None
    return [c.call_ids for c in constraints]


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


async def run_plan(request: Request, engine: Engine, plan: RequestPlan) -> Response:
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
    config = state_of(request).config
    return EventStreamResponse(
        plan.writer,
        with_keepalive(handle.batches(), config.keepalive_seconds),
        cancel=handle.cancel,  # type: ignore[return-value]
        send_timeout=config.send_timeout_seconds,
    )


def with_header(app: Response, name: str, value: str) -> Response:
    """`app` (a JSON response or an event stream) answered with one more header."""
    header = (name.lower().encode("latin-1"), value.encode("latin-1"))

    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await app(scope, receive, send_with_header)

    return answer  # type: ignore[return-value]  # an ASGI app, which a route may answer with
