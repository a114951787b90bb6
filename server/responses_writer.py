"""OpenAI's Responses API, answer side: the `response` object and its event stream.

A response's `output` holds a `message` item (one `output_text` part) when the model wrote text
(or wrote nothing at all), then one `function_call` item per call. Streamed, it is the documented
sequence, each event numbered by `sequence_number`:

    response.created, response.in_progress,
    [response.output_item.added (message), response.content_part.added,
     response.output_text.delta ..., response.output_text.done, response.content_part.done,
     response.output_item.done]
    [response.output_item.added (function_call), response.function_call_arguments.delta ...,
     response.function_call_arguments.done, response.output_item.done] per call
    response.completed (or response.incomplete when max_output_tokens cut it short)

A stream that fails ends with an `error` event and `response.failed`. Events are sent as
`event: <type>` + `data: <json>`, without OpenAI chat's `[DONE]`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from mlx_mistral.batch import TokenEvent
from mlx_mistral.errors import MistralError
from mlx_mistral.sampling.params import SamplingParams

from .responses_tools import call_item_names, flat_name
from .streaming import ChoiceTally, Delta, ResponseWriter, Served

Keep = Callable[[dict[str, Any], dict[str, Any] | None], None]
"""Called with a finished response and its output as a chat message (None: no output)."""


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def sse_event(payload: dict[str, Any]) -> bytes:
    data = json.dumps(payload, ensure_ascii=False)
    return f"event: {payload['type']}\ndata: {data}\n\n".encode()


def output_text(text: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


class ResponsesWriter(ResponseWriter):
    """Renders one generation as a Responses `response` object or its event stream.

    Args:
        served, params, stats, call_ids: as `ResponseWriter` (a response has one choice).
        echo: the request fields the response states back (`ResponsesRequest.echo`).
        keep: stores the finished response (None: `store: false`, nothing is kept).
        namespaced: the offered tool names that stand for a namespace's function, each with its
            (namespace, name): a call of one is an item with `namespace` and its own `name`.
    """

    id_prefix = "resp"

    def __init__(
        self,
        served: Served,
        params: SamplingParams,
        *,
        stats: dict[str, Any],
        echo: dict[str, Any],
        call_ids: list[tuple[str, ...]] | None = None,
        keep: Keep | None = None,
        namespaced: dict[str, tuple[str, str]] | None = None,
    ):
        super().__init__(served, params, include_usage=True, stats=stats, call_ids=call_ids)
        self.id = new_item_id("resp")  # OpenAI's ids use "_"
        self.echo = echo
        self.keep = keep
        self.namespaced = namespaced or {}
        self.sequence_number = 0
        self.output: list[dict[str, Any]] = []  # finished items, streamed
        self.message: dict[str, Any] | None = None  # the message item being streamed
        self.texts: list[str] = []
        self.text_logprobs: list[dict[str, Any]] = []
        self.held_logprobs: list[dict[str, Any]] = []
        self.call: dict[str, Any] | None = None  # the function_call item being streamed
        self.finish: str | None = None

    # -- the response object ---------------------------------------------------------------------
    def _usage(self) -> dict[str, Any]:
        output_tokens = sum(self.completion_tokens)
        return {
            "input_tokens": self.prompt_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.prompt_tokens + output_tokens,
        }

    def _body(self, status: str, output: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        body = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": None,
            "model": self.served.model,
            "output": output,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            **self.echo,
            "usage": None,
            **extra,
        }
        if status in ("completed", "incomplete"):
            body["usage"] = self._usage()
        if status == "incomplete":
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        return body

    def _finished(self, output: list[dict[str, Any]]) -> dict[str, Any]:
        """The final response (stored if asked for)."""
        status = "incomplete" if self.finish == "length" else "completed"
        body = self._body(status, output, completed_at=None)
        if status == "completed":
            body["completed_at"] = body["created_at"]  # answers finish within the second or so
        if self.keep is not None:
            self.keep(body, _as_chat_message(output))
        return body

    def _item_status(self) -> str:
        return "incomplete" if self.finish == "length" else "completed"

    def response(self, choices: list[ChoiceTally]) -> dict[str, Any]:
        choice = choices[0]
        self.finish = choice.finish_reason
        status = self._item_status()
        output = []
        if choice.text or not choice.tool_calls:
            logprobs = [self.formatter.chat(lp) for lp in choice.logprobs] if self.logprobs else []
            output.append(
                {
                    "id": new_item_id("msg"),
                    "type": "message",
                    "role": "assistant",
                    "status": status,
                    "content": [output_text(choice.text, logprobs)],
                }
            )
        for call in choice.tool_calls or ():
            fn = call["function"]
            output.append(self._call_item(call["id"], fn["name"], fn["arguments"], "completed"))
        return self._finished(output)

    def _call_item(self, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
        return {
            "id": new_item_id("fc"),
            "type": "function_call",
            "status": status,
            "call_id": call_id,
            **call_item_names(name, self.namespaced),
            "arguments": arguments,
        }

    # -- the stream ------------------------------------------------------------------------------
    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return sse_event(payload)

    def _where(self) -> dict[str, Any]:
        return {"output_index": len(self.output)}

    def chunk_logprobs(self, event: TokenEvent) -> Any:
        return {"content": [self.formatter.chat(event.logprobs)]}

    def opening(self) -> list[bytes]:
        snapshot = self._body("in_progress", [])
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def delta(self, delta: Delta) -> bytes:
        events: list[bytes] = []
        if delta.finish_reason is not None:
            self.finish = delta.finish_reason
            events += self._close_message() + self._close_call()
            return b"".join(events)
        # A token whose text is held back (half a character) sends its logprob with the next text.
        self.held_logprobs += delta.logprobs["content"] if delta.logprobs else []
        if delta.text:
            events += self._open_message()
            self.texts.append(delta.text)
            logprobs, self.held_logprobs = self.held_logprobs, []
            self.text_logprobs += logprobs
            events.append(
                self._event(
                    "response.output_text.delta",
                    item_id=self.message["id"],  # type: ignore[index]
                    **self._where(),
                    content_index=0,
                    delta=delta.text,
                    logprobs=logprobs,
                )
            )
        for call in delta.tool_calls:
            if "id" in call:  # a call's first delta: its id and name
                events += self._close_message() + self._close_call()
                self.call = self._call_item(call["id"], call["function"]["name"], "", "in_progress")
                events.append(
                    self._event("response.output_item.added", **self._where(), item=self.call)
                )
            fragment = call["function"].get("arguments", "")
            if fragment and self.call is not None:
                self.call["arguments"] += fragment
                events.append(
                    self._event(
                        "response.function_call_arguments.delta",
                        item_id=self.call["id"],
                        **self._where(),
                        delta=fragment,
                    )
                )
        return b"".join(events)

    def _open_message(self) -> list[bytes]:
        if self.message is not None:
            return []
        self.message = {
            "id": new_item_id("msg"),
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        where = self._where()
        part = {"item_id": self.message["id"], **where, "content_index": 0}
        return [
            self._event("response.output_item.added", **where, item=self.message),
            self._event("response.content_part.added", **part, part=output_text("", [])),
        ]

    def _close_message(self) -> list[bytes]:
        if self.message is None:
            return []
        text, logprobs = "".join(self.texts), self.text_logprobs
        item = {**self.message, "status": self._item_status()}
        item["content"] = [output_text(text, logprobs)]
        where = {"item_id": item["id"], **self._where(), "content_index": 0}
        events = [
            self._event("response.output_text.done", **where, text=text, logprobs=logprobs),
            self._event("response.content_part.done", **where, part=output_text(text, logprobs)),
            self._event("response.output_item.done", **self._where(), item=item),
        ]
        self.output.append(item)
        self.message = None
        return events

    def _close_call(self) -> list[bytes]:
        if self.call is None:
            return []
        item = {**self.call, "status": "completed"}
        events = [
            self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                **self._where(),
                arguments=item["arguments"],
            ),
            self._event("response.output_item.done", **self._where(), item=item),
        ]
        self.output.append(item)
        self.call = None
        return events

    def closing(self) -> list[bytes]:
        events = self._close_message() + self._close_call()
        if not self.output:  # nothing at all was written: an empty message, as OpenAI sends
            events += self._open_message() + self._close_message()
        body = self._finished(self.output)
        kind = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
        return [*events, self._event(kind, response=body)]

    def failure(self, exc: MistralError) -> list[bytes]:
        error = {"code": exc.code or exc.type, "message": exc.message, "param": exc.param}
        failed = self._body("failed", self.output, error={**error, "code": "server_error"})
        return [self._event("error", **error), self._event("response.failed", response=failed)]


def _as_chat_message(output: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A response's output as the assistant message that continues the conversation (None when
    it is empty: the chat format cannot hold an empty answer)."""
    text = "".join(
        part["text"] for item in output if item["type"] == "message" for part in item["content"]
    )
    calls = [
        {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": _offered_name(item), "arguments": item["arguments"]},
        }
        for item in output
        if item["type"] == "function_call"
    ]
    if not text and not calls:
        return None
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _offered_name(call: dict[str, Any]) -> str:
    """The name the model wrote for a function_call item (a namespace's function is offered
    under a joined name)."""
    namespace = call.get("namespace")
    return call["name"] if namespace is None else flat_name(namespace, call["name"])
