"""Anthropic's Messages API, answer side: the `message` object, its event stream, its errors,
and the two endpoints (`POST /v1/messages`, `POST /v1/messages/count_tokens`).

A stream is Anthropic's sequence of named events (`event: <type>` then `data: {json}`):

    message_start, ping,
    (content_block_start, content_block_delta*, content_block_stop)*   text, then tool_use blocks
    message_delta (stop_reason, stop_sequence, usage), message_stop

Text comes as `text_delta`s and a call's arguments as `input_json_delta`s; keep-alives are
`ping` events; a stream that fails ends with an `error` event. `message_start` waits for the
engine's first event, which says how much of the prompt the prefix cache held, so that it and
`message_delta` report the same usage (SSE comments keep the connection alive until then).
Errors are Anthropic's `{"type": "error", "error": {...}}` (`errors.anthropic_error_body`, which
`app.guarded` and the guards pick for these paths). Usage follows Anthropic's split:
`input_tokens` are the prompt tokens the prefix cache did not hold, `cache_read_input_tokens`
the ones it did (their sum is what `count_tokens` answers), the same in `message_start`,
`message_delta` and a whole body. Tool-use ids read "toolu_..." (`tool_use_id`). Any model
name is served: clients such as Claude Code send `claude-*` names, and `model` in the answer
names what served it. `max_tokens` is a ceiling: past what the context window leaves, it is
lowered to fit, and an answer that fills the window stops with "model_context_window_exceeded".
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlx_mistral.batch import TokenEvent
from mlx_mistral.chat import encode_chat_request
from mlx_mistral.errors import MistralError
from mlx_mistral.sampling.params import SamplingParams

from .anthropic_protocol import MessagesRequest
from .anthropic_tools import tool_use_id
from .errors import anthropic_error_body
from .handling import RequestPlan, guarded, read_json, run_plan, state_of, stats_of, tool_call_ids
from .streaming import ChoiceTally, Delta, ResponseWriter, Served


def sse_event(payload: dict[str, Any]) -> bytes:
    """One named event: `event: <type>` then its data."""
    data = json.dumps(payload, ensure_ascii=False)
    return f"event: {payload['type']}\ndata: {data}\n\n".encode()


class MessagesWriter(ResponseWriter):
    """Renders one answer as an Anthropic `message` or its event stream (one choice).

    Args:
        prompt_length: the prompt's tokens (`message_start` is sent before any engine event).
        window_limited: max_tokens was lowered to what the context window leaves.
        (the rest as `ResponseWriter`)
    """

    id_prefix = "msg"
    ping = sse_event({"type": "ping"})
    keepalive = b": waiting for the model\n\n"  # until message_start; `ping` events after

    def __init__(
        self,
        served: Served,
        params: SamplingParams,
        *,
        stats: dict[str, Any],
        call_ids: list[tuple[str, ...]] | None,
        prompt_length: int,
        window_limited: bool,
    ):
        super().__init__(served, params, include_usage=True, stats=stats, call_ids=call_ids)
        self.id = self.id.replace("-", "_", 1)  # Anthropic's ids read "msg_..."
        self.prompt_tokens = prompt_length
        self.window_limited = window_limited
        self.stop_sequence: str | None = None
        self.block = -1  # the index of the content block the stream has open (or last closed)
        self.block_open = False
        self.block_type: str | None = None
        self.started = False  # message_start sent

    # -- the engine's side -----------------------------------------------------------------
    def _record(self, event: TokenEvent) -> None:
        super()._record(event)
        if event.finish_reason is not None:
            self.stop_sequence = event.stop_sequence

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        if reason == "tool_calls" or (called and reason == "stop"):
            return "tool_use"
        if reason == "stop":
            return "stop_sequence" if self.stop_sequence is not None else "end_turn"
        if reason == "length":
            return "model_context_window_exceeded" if self.window_limited else "max_tokens"
        return reason

    def _usage(self) -> dict[str, Any]:
        return {
            "input_tokens": self.prompt_tokens - self.cached_tokens,
            "output_tokens": sum(self.completion_tokens),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": self.cached_tokens,
        }

    def _message(self, content: list[dict[str, Any]], stop_reason: str | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.served.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": self.stop_sequence if stop_reason == "stop_sequence" else None,
            "usage": self._usage(),
        }

    # -- one body --------------------------------------------------------------------------
    def response(self, choices: list[ChoiceTally]) -> dict[str, Any]:
        choice = choices[0]
        content: list[dict[str, Any]] = []
        if choice.text:
            content.append({"type": "text", "text": choice.text})
        for call in choice.tool_calls or ():
            fn = call["function"]
            block = {
                "id": tool_use_id(call["id"]),
                "name": fn["name"],
                "input": _arguments(fn["arguments"]),
            }
            content.append({"type": "tool_use", **block})
        return self._message(content, choice.finish_reason)

    # -- the stream ------------------------------------------------------------------------
    def _start(self) -> list[bytes]:
        self.started, self.keepalive = True, self.ping
        start = {"type": "message_start", "message": self._message([], None)}
        return [sse_event(start), self.ping]

    def _chunks(self, batch: list[TokenEvent]) -> Iterator[bytes]:
        if not self.started:
            # How much of the prompt the prefix cache holds is known once the engine runs it.
            # (output_tokens stays 0 here, as Anthropic's message_start has it).
            self.cached_tokens = max((event.cached_tokens for event in batch), default=0)
            yield from self._start()
        yield from super()._chunks(batch)

    def _start_block(self, block: dict[str, Any]) -> list[bytes]:
        out = self._stop_block()
        self.block += 1
        self.block_open, self.block_type = True, block["type"]
        start = {"type": "content_block_start", "index": self.block, "content_block": block}
        out.append(sse_event(start))
        return out

    def _stop_block(self) -> list[bytes]:
        if not self.block_open:
            return []
        self.block_open = False
        return [sse_event({"type": "content_block_stop", "index": self.block})]

    def _block_delta(self, delta: dict[str, Any]) -> bytes:
        return sse_event({"type": "content_block_delta", "index": self.block, "delta": delta})

    def delta(self, delta: Delta) -> bytes:
        out: list[bytes] = []
        if delta.text:
            if not (self.block_open and self.block_type == "text"):
                out += self._start_block({"type": "text", "text": ""})
            out.append(self._block_delta({"type": "text_delta", "text": delta.text}))
        for call in delta.tool_calls:
            fn = call["function"]
            if "id" in call:  # a call's first delta: its id and name
                call_id = tool_use_id(call["id"])
                block = {"type": "tool_use", "id": call_id, "name": fn["name"], "input": {}}
                out += self._start_block(block)
            if fn.get("arguments"):
                out.append(
                    self._block_delta({"type": "input_json_delta", "partial_json": fn["arguments"]})
                )
        if delta.finish_reason is not None:
            out += self._stop_block()
            reason = delta.finish_reason
            stop_sequence = self.stop_sequence if reason == "stop_sequence" else None
            body = {"stop_reason": reason, "stop_sequence": stop_sequence}
            out.append(sse_event({"type": "message_delta", "delta": body, "usage": self._usage()}))
        return b"".join(out)

    def chunk_logprobs(self, event: TokenEvent) -> Any:
        return None  # the Messages API has no logprobs (never asked for)

    def closing(self) -> list[bytes]:
        opening = [] if self.started else self._start()
        return [*opening, sse_event({"type": "message_stop"})]

    def failure(self, exc: MistralError) -> list[bytes]:
        return [sse_event(anthropic_error_body(exc))]


def _arguments(text: str) -> Any:
    """A call's input; a call cut short by max_tokens (stop_reason says so) has input {}."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {}


# -- models ------------------------------------------------------------------------------------
ANTHROPIC_VERSION_HEADER = "anthropic-version"
"""Sent by every Anthropic client: `/v1/models` answers such a request in Anthropic's shape."""


def anthropic_model(card: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI model card (`ServerState.model_card`) as Anthropic's model object."""
    created = datetime.fromtimestamp(card["created"], tz=UTC)
    return {
        "type": "model",
        "id": card["id"],
        "display_name": card["id"],
        "created_at": created.isoformat().replace("+00:00", "Z"),
    }


def anthropic_model_list(card: dict[str, Any]) -> dict[str, Any]:
    """Anthropic's page of models (one page: this server serves one model)."""
    model = anthropic_model(card)
    return {"data": [model], "has_more": False, "first_id": model["id"], "last_id": model["id"]}


# -- the endpoints -----------------------------------------------------------------------------
@guarded
async def create_message(request: Request) -> Response:
    state = state_of(request)
    req = MessagesRequest.from_json(await read_json(request))
    engine = state.live_engine()  # any model name: see the module docstring
    chat = req.as_chat()
    encoded, constraints = await state.chat_prompt(request, engine, chat)
    prompt = encoded.ids
    call_ids = tool_call_ids(chat.parses_tool_calls, constraints)
    # Claude Code sends max_tokens 32000 as a ceiling (Anthropic requires the field).
    params, limited = state.fit_to_window(req.params, True, len(prompt))
    writer = MessagesWriter(
        state.served,
        params,
        stats=stats_of(request),
        call_ids=call_ids,
        prompt_length=len(prompt),
        window_limited=limited,
    )
    plan = RequestPlan(
        prompt,
        params,
        writer,
        req.stream,
        continuation=encoded.continues,  # a prefilled answer goes on from its text
        constraints=constraints,
    )
    return await run_plan(request, engine, plan)


@guarded
async def count_tokens(request: Request) -> Response:
    """The exact prompt length `create_message` would run (chat_prompt without the grammars)."""
    req = MessagesRequest.from_json(await read_json(request), count_only=True)
    tokenizer = state_of(request).live_engine().tokenizer
    chat = req.as_chat()
    prompt, _ = await asyncio.to_thread(
        encode_chat_request, tokenizer, chat.messages, chat.structured
    )
    return JSONResponse({"input_tokens": len(prompt)})


ROUTES = [
    Route("/v1/messages", create_message, methods=["POST"]),
    Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
]
