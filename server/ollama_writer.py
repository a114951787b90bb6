"""Ollama's wire format: NDJSON lines for `/api/chat` and `/api/generate`, or one object.

Each streamed line is one JSON object `{"model", "created_at", "message" | "response",
"done": false}`; the last has `"done": true`, `done_reason` ("stop" or "length") and the counts
and durations Ollama reports (nanoseconds). Tool calls go out whole, in Ollama's shape
(`{"id", "function": {"index", "name", "arguments": {...}}}`, arguments an object), in one line
before the last: Ollama's clients read a call only once it is complete. A stream that fails
ends with `{"error": "..."}`, which Ollama's clients raise.
"""

from __future__ import annotations

import json
import time
from abc import abstractmethod
from datetime import UTC, datetime
from typing import Any

from mlx_mistral.batch import TokenEvent
from mlx_mistral.errors import MistralError
from mlx_mistral.sampling.params import SamplingParams

from .errors import ollama_error_body
from .streaming import ChoiceTally, Delta, ResponseWriter, Served

NDJSON = b"application/x-ndjson"


def timestamp() -> str:
    """Ollama's `created_at`: RFC 3339 in UTC."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ndjson_line(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode() + b"\n"


def ollama_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI tool calls (arguments as JSON text) -> Ollama's (arguments as an object)."""
    return [
        {
            "id": call["id"],
            "function": {
                "index": index,
                "name": call["function"]["name"],
                "arguments": json.loads(call["function"]["arguments"] or "{}"),
            },
        }
        for index, call in enumerate(calls)
    ]


class OllamaWriter(ResponseWriter):
    """What `/api/chat` and `/api/generate` share: the envelope, the final counts, NDJSON.

    Args:
        served: the server's model name, prices and logprob formatter.
        params: the request's sampling parameters.
        model: the model name the request asked for, echoed as Ollama does.
        stats: the request's access-log record (its start and time to first token give the
            durations).
        call_ids: see `ResponseWriter`.
    """

    id_prefix = "ollama"
    media_type = NDJSON
    # Sent while the first token is awaited: JSON allows whitespace before a value, so a
    # client reading lines sees it as part of the next object's line.
    keepalive = b" "
    content_key = ""

    def __init__(
        self,
        served: Served,
        params: SamplingParams,
        *,
        model: str,
        stats: dict[str, Any],
        call_ids: list[tuple[str, ...]] | None = None,
    ):
        super().__init__(served, params, include_usage=False, stats=stats, call_ids=call_ids)
        self.model = model
        self.pending_calls: dict[int, dict[str, Any]] = {}  # streamed call deltas, by index

    # -- what each endpoint renders --------------------------------------------------------------
    @abstractmethod
    def content(self, text: str, tool_calls: list[dict[str, Any]] | None = None) -> Any:
        """The `message` (chat) or `response` (generate) of one object."""

    def final_fields(self) -> dict[str, Any]:
        return {}

    # -- shared ----------------------------------------------------------------------------------
    def _object(self, content: Any, *, done: bool) -> dict[str, Any]:
        return {
            "model": self.model,
            "created_at": timestamp(),
            self.content_key: content,
            "done": done,
        }

    def _done(self, content: Any, finish_reason: str | None) -> dict[str, Any]:
        body = self._object(content, done=True)
        body["done_reason"] = "length" if finish_reason == "length" else "stop"
        body.update(self.final_fields())
        body.update(self._counts())
        return body

    def _counts(self) -> dict[str, int]:
        """Ollama's counts; the durations from the request's arrival, its first token, now."""
        started = self.stats.get("start", time.perf_counter())
        total = time.perf_counter() - started
        first = min(self.stats.get("ttft", total), total)
        ns = 1_000_000_000
        return {
            "total_duration": int(total * ns),
            "load_duration": 0,  # the model is loaded once, at start-up
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": int(first * ns),
            "eval_count": sum(self.completion_tokens),
            "eval_duration": int((total - first) * ns),
        }

    def response(self, choices: list[ChoiceTally]) -> dict[str, Any]:
        choice = choices[0]  # Ollama has one answer per request
        return self._done(self.content(choice.text, choice.tool_calls), choice.finish_reason)

    def delta(self, delta: Delta) -> bytes:
        for part in delta.tool_calls:
            self._add_call_delta(part)
        if delta.finish_reason is None:
            if not delta.text:
                return b""  # a piece of a call: sent whole, at the end
            return ndjson_line(self._object(self.content(delta.text), done=False))
        lines = b""
        if self.pending_calls:
            calls = [self.pending_calls[i] for i in sorted(self.pending_calls)]
            lines = ndjson_line(self._object(self.content("", calls), done=False))
        return lines + ndjson_line(self._done(self.content(""), delta.finish_reason))

    def _add_call_delta(self, part: dict[str, Any]) -> None:
        index = part["index"]
        if index not in self.pending_calls:
            self.pending_calls[index] = {
                "id": part["id"],
                "type": "function",
                "function": {"name": part["function"]["name"], "arguments": ""},
            }
        self.pending_calls[index]["function"]["arguments"] += part["function"]["arguments"]

    def chunk_logprobs(self, event: TokenEvent) -> Any:
        return None  # refused at the request (`logprobs`): never asked for

    def failure(self, exc: MistralError) -> list[bytes]:
        return [ndjson_line(ollama_error_body(exc))]


class OllamaChatWriter(OllamaWriter):
    """`/api/chat`: `message` objects; tool calls in the message."""

    content_key = "message"

    def content(self, text: str, tool_calls: list[dict[str, Any]] | None = None) -> Any:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if tool_calls:
            message["tool_calls"] = ollama_tool_calls(tool_calls)
        return message


class OllamaGenerateWriter(OllamaWriter):
    """`/api/generate`: `response` text; the last object holds `context` (the conversation's
    token ids, to send back as `context`) unless the prompt was raw."""

    content_key = "response"

    def __init__(self, *args: Any, context: list[int] | None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.context = context  # the prompt's ids, the answer's are added; None: raw

    def content(self, text: str, tool_calls: list[dict[str, Any]] | None = None) -> Any:
        return text

    def _record(self, event: TokenEvent) -> None:
        super()._record(event)
        if self.context is not None and event.token is not None:
            self.context.append(event.token)

    def final_fields(self) -> dict[str, Any]:
        return {} if self.context is None else {"context": self.context}


def load_response(model: str, *, chat: bool) -> dict[str, Any]:
    """Ollama's answer to a request with nothing to generate (its way to load a model)."""
    content: Any = {"role": "assistant", "content": ""} if chat else ""
    return {
        "model": model,
        "created_at": timestamp(),
        "message" if chat else "response": content,
        "done": True,
        "done_reason": "load",
    }
