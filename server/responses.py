"""OpenAI's Responses API, served: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`.

A request is translated into a chat request (`responses_protocol`), generated on the chat prompt
path (`app.chat_prompt`, `app.RequestPlan`) and rendered by `ResponsesWriter`. Responses are kept
in a bounded in-memory store (`ResponseStore`, most recent first) unless the request says
`store: false`: a kept response can be retrieved, deleted, and continued with
`previous_response_id`, which replays its conversation (input and output) ahead of the new
input. The replayed prompt is token for token the earlier one followed by the earlier answer, so
the engine's prefix cache serves it and only the new turn is prefilled.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlx_mistral.errors import InvalidRequestError, MistralError

from .handling import RequestPlan, guarded, read_json, run_plan, state_of, stats_of, tool_call_ids
from .responses_protocol import ResponsesRequest
from .responses_writer import ResponsesWriter

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


class ResponsesAPI:
    """The Responses routes of one app, over its store."""

    def __init__(self, store: ResponseStore | None = None):
        self.store = store or ResponseStore()

    def routes(self) -> list[Route]:
        out = []
        for prefix in ("/v1", ""):
            out.append(Route(f"{prefix}/responses", guarded(self.create), methods=["POST"]))
            path = f"{prefix}/responses/{{response_id}}"
            out.append(Route(path, guarded(self.retrieve), methods=["GET"]))
            out.append(Route(path, guarded(self.delete), methods=["DELETE"]))
        return out

    async def create(self, request: Request) -> Response:
        state = state_of(request)
        req = ResponsesRequest.from_json(await read_json(request))
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
        call_ids = tool_call_ids(chat.parses_tool_calls, constraints)
        conversation = (*history, *req.input_messages)

        def keep(body: dict[str, Any], answer: dict[str, Any] | None) -> None:
            answered = conversation if answer is None else (*conversation, answer)
            self.store.put(StoredResponse(body, answered))

        writer = ResponsesWriter(
            state.served,
            chat.params,
            stats=stats_of(request),
            echo=req.echo,
            call_ids=call_ids,
            keep=keep if req.store else None,
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
        return await run_plan(request, engine, plan)

    async def retrieve(self, request: Request) -> Response:
        return JSONResponse(self.store.get(request.path_params["response_id"]).body)

    async def delete(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        self.store.delete(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})
