"""OpenAI's wire formats: chat.completion(.chunk) and the legacy text_completion.

Both stream as `data: {json}` events ending in `data: [DONE]`, and end a failed stream with an
error event then `[DONE]`. A chat request with tools reads the calls out of the text with a
`ToolCallStreamer` per choice, and one body adds up what the stream would have sent
(`assemble_tool_calls`).
"""

from __future__ import annotations

import json
from typing import Any

from mlx_mistral.batch import TokenEvent
from mlx_mistral.errors import MistralError
from mlx_mistral.sampling_params import SamplingParams
from mlx_mistral.tool_calls import StreamDelta, ToolCallStreamer, assemble_tool_calls

from .errors import error_event
from .schemas import chat_choice, chunk_choice, completion_choice, envelope, usage
from .streaming import ChoiceTally, ResponseWriter, Served

DONE = b"data: [DONE]\n\n"


def sse_data(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


class OpenAIWriter(ResponseWriter):
    """What OpenAI's two formats share: the envelope, the usage object, `[DONE]`."""

    response_object = ""
    chunk_object = ""

    def _usage(self) -> dict[str, Any]:
        prompt_price, completion_price = self.served.prices
        return usage(
            self.prompt_tokens,
            sum(self.completion_tokens),
            prompt_price=prompt_price,
            completion_price=completion_price,
        )

    def _envelope(
        self, kind: str, choices: list[dict[str, Any]], with_usage: bool = False
    ) -> dict[str, Any]:
        totals = self._usage() if with_usage else None
        return envelope(kind, self.id, self.created, self.served.model, choices, totals)

    def _body(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return self._envelope(self.response_object, choices, with_usage=True)

    def _chunk(self, choices: list[dict[str, Any]]) -> bytes:
        chunk = self._envelope(self.chunk_object, choices)
        if self.include_usage:  # as OpenAI: null on every chunk but the last
            chunk["usage"] = None
        return sse_data(chunk)

    def closing(self) -> list[bytes]:
        if not self.include_usage:
            return [DONE]
        return [sse_data(self._envelope(self.chunk_object, [], with_usage=True)), DONE]

    def failure(self, exc: MistralError) -> list[bytes]:
        return [error_event(exc), DONE]


class ChatCompletionWriter(OpenAIWriter):
    """/v1/chat/completions.

    Args:
        call_ids: a request with tools: per choice, the ids its grammar forces into its calls
            (`GrammarConstraint.call_ids`); None when answers hold no tool calls.
        (the others: see `ResponseWriter`)
    """

    id_prefix = "chatcmpl"
    response_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(
        self,
        served: Served,
        params: SamplingParams,
        *,
        include_usage: bool,
        stats: dict[str, Any],
        call_ids: list[tuple[str, ...]] | None = None,
    ):
        super().__init__(served, params, include_usage=include_usage, stats=stats)
        self.call_ids = call_ids
        self.streamers = [ToolCallStreamer(call_ids=ids) for ids in call_ids or ()]
        self.called = [False] * self.n  # streamed: the choice has sent a tool call
        # Call text becomes tool_calls deltas, one chunk per token, never content.
        self.merges_tokens = not self.streamers

    def response(self, choices: list[ChoiceTally]) -> dict[str, Any]:
        rendered = []
        for i, choice in enumerate(choices):
            text, calls = "".join(choice.texts), None
            if self.call_ids is not None:  # exactly what the stream would have sent
                text, calls = assemble_tool_calls(choice.texts, self.call_ids[i])
            reason = choice.finish_reason
            if calls and reason == "stop":
                reason = "tool_calls"
            entries = [self.formatter.chat(lp) for lp in choice.logprobs]
            rendered.append(chat_choice(i, text, reason, entries if self.logprobs else None, calls))
        return self._body(rendered)

    def chunk_logprobs(self, event: TokenEvent) -> Any:
        return {"content": [self.formatter.chat(event.logprobs)]}

    def opening(self) -> list[bytes]:
        return [
            self._chunk([chunk_choice(i, {"role": "assistant", "content": ""}, None)])
            for i in range(self.n)
        ]

    def stream_content(self, event: TokenEvent) -> tuple[str, tuple[dict[str, Any], ...]]:
        if not self.streamers:
            return event.text, ()
        streamer = self.streamers[event.index]
        delta = streamer.feed(event.text)
        if event.finish_reason is not None:
            last = streamer.finish()
            delta = StreamDelta(delta.content + last.content, delta.tool_calls + last.tool_calls)
        self.called[event.index] |= bool(delta.tool_calls)
        return delta.content, delta.tool_calls

    def stream_finish_reason(self, index: int, reason: str) -> str:
        return "tool_calls" if self.called[index] and reason == "stop" else reason

    def delta(
        self,
        index: int,
        text: str,
        finish: str | None,
        logprobs: Any,
        tool_calls: tuple[dict[str, Any], ...] = (),
    ) -> bytes:
        delta: dict[str, Any] = {}
        if finish is None and (text or not tool_calls):
            delta["content"] = text
        if tool_calls:
            delta["tool_calls"] = list(tool_calls)
        return self._chunk([chunk_choice(index, delta, finish, logprobs)])


class CompletionWriter(OpenAIWriter):
    """/v1/completions (legacy): logprobs name where each token's text starts in its choice."""

    id_prefix = "cmpl"
    response_object = chunk_object = "text_completion"

    def response(self, choices: list[ChoiceTally]) -> dict[str, Any]:
        rendered = []
        for i, choice in enumerate(choices):
            lp = None
            if self.logprobs:
                lp = self.formatter.completion(choice.logprobs, choice.offsets)
            rendered.append(completion_choice(i, "".join(choice.texts), choice.finish_reason, lp))
        return self._body(rendered)

    def chunk_logprobs(self, event: TokenEvent) -> Any:
        return self.formatter.completion([event.logprobs], [self.text_offsets[event.index]])

    def delta(
        self,
        index: int,
        text: str,
        finish: str | None,
        logprobs: Any,
        tool_calls: tuple[dict[str, Any], ...] = (),
    ) -> bytes:
        return self._chunk([completion_choice(index, text, finish, logprobs)])
