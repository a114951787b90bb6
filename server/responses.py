"""OpenAI's Responses API, served: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`,
`GET /v1/responses/{id}/input_items`.

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
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlx_mistral.errors import InvalidRequestError

from .handling import RequestPlan, guarded, read_json, run_plan, state_of, stats_of, tool_call_ids
from .response_items import item_page, stored_items
from .response_store import ResponseStore, StoredResponse
from .responses_protocol import ResponsesRequest
from .responses_writer import ResponsesWriter


class ResponsesAPI:
    """The Responses routes of one app, over its store."""

    def __init__(self, store: ResponseStore | None = None):
        self.store = ResponseStore() if store is None else store

    def routes(self) -> list[Route]:
        out = []
        for prefix in ("/v1", ""):
            out.append(Route(f"{prefix}/responses", guarded(self.create), methods=["POST"]))
            path = f"{prefix}/responses/{{response_id}}"
            out.append(Route(path, guarded(self.retrieve), methods=["GET"]))
            out.append(Route(path, guarded(self.delete), methods=["DELETE"]))
            out.append(Route(f"{path}/input_items", guarded(self.input_items), methods=["GET"]))
        return out

    async def create(self, request: Request) -> Response:
        state = state_of(request)
        body = await read_json(request)
        req = ResponsesRequest.from_json(body)
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

    async def input_items(self, request: Request) -> Response:
        stored = self.store.get(request.path_params["response_id"])
        return JSONResponse(item_page(stored.input_items, request.query_params))

    async def delete(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        self.store.delete(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})
