"""OpenAI's Responses API, served: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`,
`GET /v1/responses/{id}/input_items`, `POST /v1/responses/input_tokens` (the input's count).

A request is translated into a chat request (`responses_protocol`), generated on the chat prompt
path (`app.chat_prompt`, `app.RequestPlan`) and rendered by `ResponsesWriter`. Responses are kept
in a bounded in-memory store (`response_store.py`, most recent first) unless the request says
`store: false`: a kept response can be retrieved, deleted, listed its input items, and continued
with `previous_response_id`, which replays its conversation (input and output) ahead of the new
input. The replayed prompt is token for token the earlier one followed by the earlier answer, so
the engine's prefix cache serves it and only the new turn is prefilled.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlx_mistral.chat import ChatPrompt
from mlx_mistral.engine import Engine
from mlx_mistral.errors import InvalidRequestError
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
from .response_items import item_page, stored_items
from .response_store import ResponseStore, StoredResponse
from .responses_protocol import ResponsesRequest
from .responses_tools import NOT_OFFERED_HEADER
from .responses_writer import ResponsesWriter
from .schemas import ChatCompletionRequest


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
        self.store = ResponseStore() if store is None else store

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
        items = stored_items(body["input"]) if req.store else ()

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
