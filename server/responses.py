"""OpenAI's Responses API, served: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`,
`GET /v1/responses/{id}/input_items`, `POST /v1/responses/input_tokens` (the input's count).

A request is translated into a chat request (`responses_protocol`), generated on the chat prompt
path (`app.chat_prompt`, `app.RequestPlan`) and rendered by `ResponsesWriter`. Responses are kept
in a bounded in-memory store (`ResponseStore`, most recent first) unless the request says
`store: false`: a kept response can be retrieved, deleted, listed its input items, and continued
with `previous_response_id`, which replays its conversation (input and output) ahead of the new
input. The replayed prompt is token for token the earlier one followed by the earlier answer, so
the engine's prefix cache serves it and only the new turn is prefilled.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlx_mistral.chat import ChatPrompt
from mlx_mistral.engine import Engine
from mlx_mistral.errors import InvalidRequestError, MistralError
from mlx_mistral.tools.grammar import GrammarConstraint

from .errors import PathNotFoundError
from .handling import (
    RequestPlan,
    guarded,
    read_json,
    run_plan,
    state_of,
    stats_of,
    tool_call_ids,
    with_header,
)
from .responses_protocol import ResponsesRequest
from .responses_tools import NOT_OFFERED_HEADER
from .responses_writer import ResponsesWriter, new_item_id
from .schemas import ChatCompletionRequest

MAX_STORED = 256
"""Responses kept for retrieval and `previous_response_id`; the oldest are forgotten first. A
kept conversation shares its messages with the responses it continues, so a chain of N turns
costs N message references per response, not N copies of the text."""


class ResponseNotFoundError(MistralError):
    status = 404
    type = "invalid_request_error"
    code = "response_not_found"


@dataclass(frozen=True)
class StoredResponse:
    body: dict[str, Any]  # the response object, as returned
    conversation: tuple[dict[str, Any], ...]  # chat messages without the system prompt
    input_items: tuple[dict[str, Any], ...] = ()  # the request's `input`, as items with ids


_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def input_items(raw: str | list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """A validated `input` as the input-items list shows it: a string is one user message, a
    message's string content one text part, and every item has an id (the client's, or new)."""
    items = [{"type": "message", "role": "user", "content": raw}] if isinstance(raw, str) else raw
    out = []
    for item in items:
        item = {"type": "message", **item}
        kind = item["type"]
        if kind == "message" and isinstance(item.get("content"), str):
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            extra = {"annotations": []} if part == "output_text" else {}
            item["content"] = [{"type": part, "text": item["content"], **extra}]
        item.setdefault("id", new_item_id(_ID_PREFIXES.get(kind, "item")))
        if kind != "reasoning":
            item.setdefault("status", "completed")
        out.append(item)
    return tuple(out)


def item_page(items: tuple[dict[str, Any], ...], query: Any) -> dict[str, Any]:
    """One page of `items` as `GET /v1/responses/{id}/input_items` answers, from its query:
    `limit` (1-100, default 20), `order` (`desc`, the default, or `asc`), `after` (an item id:
    the page starts after it). Raises InvalidRequestError naming a bad parameter."""
    try:
        limit = int(query.get("limit", 20))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise InvalidRequestError("limit must be an integer from 1 to 100", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequestError(f"order must be asc or desc, got {order[:100]!r}", param="order")
    ordered = list(items) if order == "asc" else list(reversed(items))
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise InvalidRequestError(
                f"after: no input item with id {after[:100]!r} in this response", param="after"
            )
        ordered = ordered[ids.index(after) + 1 :]
    page = ordered[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(ordered) > limit,
    }


class ResponseStore:
    """The most recent `capacity` responses, by id (least recently used forgotten first)."""

    def __init__(self, capacity: int = MAX_STORED):
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, stored: StoredResponse) -> None:
        self._items[stored.body["id"]] = stored
        self._items.move_to_end(stored.body["id"])
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        """Raises ResponseNotFoundError (404) for an id never kept or already forgotten."""
        stored = self._items.get(response_id)
        if stored is None:
            raise ResponseNotFoundError(
                f"no response with id {response_id[:100]!r} is stored on this server: it was "
                f"created with store: false, deleted, or forgotten (only the last "
                f"{self.capacity} are kept, in memory, until the server restarts)",
                param=param,
            )
        self._items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        del self._items[response_id]


class PlannedPrompt(NamedTuple):
    engine: Engine
    chat: ChatCompletionRequest
    encoded: ChatPrompt
    constraints: list[GrammarConstraint] | None
    history: tuple[dict[str, Any], ...]


async def _no_endpoint(request: Request) -> Response:
    raise PathNotFoundError(f"no such endpoint: {request.method} {request.url.path}")


class ResponsesAPI:
    """The Responses routes of one app, over its store."""

    def __init__(self, store: ResponseStore | None = None):
        self.store = store or ResponseStore()

    def routes(self) -> list[Route]:
        out = []
        for prefix in ("/v1", ""):
            out.append(Route(f"{prefix}/responses", guarded(self.create), methods=["POST"]))
            count = guarded(self.count_input_tokens)
            out.append(Route(f"{prefix}/responses/input_tokens", count, methods=["POST"]))
            path = f"{prefix}/responses/{{response_id}}"
            # POST /v1/responses/<anything else> is no endpoint (a 404), not a wrong method on one.
            out.append(Route(path, guarded(_no_endpoint), methods=["POST", "PUT", "PATCH"]))
            out.append(Route(path, guarded(self.retrieve), methods=["GET"]))
            out.append(Route(path, guarded(self.delete), methods=["DELETE"]))
            out.append(Route(f"{path}/input_items", guarded(self.input_items), methods=["GET"]))
        return out

    async def _prompt(self, request: Request, req: ResponsesRequest) -> PlannedPrompt:
        """The prompt of a request: its history (`previous_response_id`), then its input."""
        state = state_of(request)
        state.check_model(req.chat.model)
        history: tuple[dict[str, Any], ...] = ()
        if req.previous_response_id is not None:
            history = self.store.get(req.previous_response_id, "previous_response_id").conversation
        engine = state.live_engine()
        chat = dataclasses.replace(req.chat, messages=req.messages(list(history)))
        try:
            encoded, constraints = await state.chat_prompt(request, engine, chat)
        except InvalidRequestError as exc:
            raise req.rename_error(exc, len(history)) from None
        return PlannedPrompt(engine, chat, encoded, constraints, history)

    async def count_input_tokens(self, request: Request) -> Response:
        """`POST /v1/responses/input_tokens`: the tokens a response to this body would read."""
        req = ResponsesRequest.from_json(await read_json(request))
        planned = await self._prompt(request, req)
        count = len(planned.encoded.ids)
        return JSONResponse({"object": "response.input_tokens", "input_tokens": count})

    async def create(self, request: Request) -> Response:
        state = state_of(request)
        body = await read_json(request)
        req = ResponsesRequest.from_json(body)
        engine, chat, encoded, constraints, history = await self._prompt(request, req)
        call_ids = tool_call_ids(chat.parses_tool_calls, constraints)
        conversation = (*history, *req.input_messages)
        items = input_items(body["input"]) if req.store else ()

        def keep(response: dict[str, Any], answer: dict[str, Any] | None) -> None:
            answered = conversation if answer is None else (*conversation, answer)
            self.store.put(StoredResponse(response, answered, items))

        writer = ResponsesWriter(
            state.served,
            chat.params,
            stats=stats_of(request),
            echo=req.echo,
            call_ids=call_ids,
            keep=keep if req.store else None,
            namespaced=req.tools.namespaced,
        )
        prompt = encoded.ids
        params = state.fit_max_tokens(chat.params, chat.max_tokens_given, len(prompt))
        plan = RequestPlan(
            prompt,
            params,
            writer,
            chat.stream,
            "input",
            continuation=encoded.continues,
            constraints=constraints,
        )
        response = await run_plan(request, engine, plan)
        if not req.tools.not_offered:
            return response
        req.tools.log_not_offered()
        return with_header(response, NOT_OFFERED_HEADER, ", ".join(req.tools.not_offered))

    async def retrieve(self, request: Request) -> Response:
        return JSONResponse(self.store.get(request.path_params["response_id"]).body)

    async def input_items(self, request: Request) -> Response:
        stored = self.store.get(request.path_params["response_id"])
        return JSONResponse(item_page(stored.input_items, request.query_params))

    async def delete(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        self.store.delete(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})
