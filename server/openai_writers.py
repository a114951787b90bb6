"""OpenAI's wire formats: chat.completion(.chunk) and the legacy text_completion.

Both stream as `data: {json}` events ending in `data: [DONE]`, and end a failed stream with an
error event then `[DONE]`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mlx_mistral.batch import TokenEvent
from mlx_mistral.errors import MistralError
from mlx_mistral.sampling.params import SamplingParams

from .errors import error_event
from .schemas import chat_choice, chunk_choice, completion_choice, envelope, usage
from .streaming import ChoiceTally, Delta, ResponseWriter, Served

if TYPE_CHECKING:
    from mlx_mistral.sampling.sampler import TokenLogprobs

DONE = b"data: [DONE]\n\n"


def sse_data(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def prediction_counts(prediction: Sequence[int], output: Sequence[int]) -> tuple[int, int]:
    """OpenAI's accepted and rejected prediction tokens: the prediction's tokens that appear in
    the output (each at most as often as it appears there) and those that do not. A perfect
    prediction is all accepted, whatever speculative decoding did or did not verify. Linear in
    the lengths: a prediction may be a whole file."""
    accepted = sum((Counter(prediction) & Counter(output)).values())
    return accepted, len(prediction) - accepted


class OpenAIWriter(ResponseWriter):
    """What OpenAI's two formats share: the envelope, the usage object, `[DONE]`."""

    response_object = ""
    chunk_object = ""
    # The request's `prediction` as token ids (None: it sent none): usage reports what became of
    # it, and each choice's output token ids are kept to count that.
    prediction_ids: list[int] | None = None

    def expect(self, prediction_ids: list[int]) -> None:
        """Report in usage what became of this prediction (the request's, as token ids)."""
        self.prediction_ids = prediction_ids
        self.output_ids: dict[int, list[int]] = {}  # per choice, the tokens written

    def _record(self, event: TokenEvent) -> None:
        super()._record(event)
        if self.prediction_ids is not None and event.token is not None:
            self.output_ids.setdefault(event.index, []).append(event.token)

    def _usage(self) -> dict[str, Any]:
        prompt_price, completion_price = self.served.prices
        predicted = None
        if self.prediction_ids is not None:
            counts = [
                prediction_counts(self.prediction_ids, ids) for ids in self.output_ids.values()
            ]
            predicted = (sum(a for a, _ in counts), sum(r for _, r in counts))
            if not counts:  # nothing written (yet): none of the prediction appeared
                predicted = (0, len(self.prediction_ids))
        totals = usage(
            self.prompt_tokens,
            sum(self.completion_tokens),
            prompt_price=prompt_price,
            completion_price=completion_price,
            predicted=predicted,
        )
        # OpenAI's field for the prompt tokens served from a cache (here: the prefix cache).
        totals["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return totals

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
    """/v1/chat/completions: a choice that made tool calls finishes with "tool_calls".

    Args (besides `ResponseWriter`'s):
        continuation: the answer continues a final assistant message, so its first token keeps
            its leading space (in the content and in the logprobs alike).
        legacy_functions: the request sent the legacy `functions`: its one call is answered as
            `function_call` (finish reason "function_call"), as OpenAI answers it.
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
        continuation: bool = False,
        legacy_functions: bool = False,
    ):
        super().__init__(
            served, params, include_usage=include_usage, stats=stats, call_ids=call_ids
        )
        # Per choice: its next logprob entry is the answer's first token, whose dummy-prefix
        # space the content drops (the tokenizer's detokenizer does the same).
        self.bare_start = [not continuation] * self.n
        self.legacy_functions = legacy_functions

    def _entry(self, index: int, lp: TokenLogprobs) -> dict[str, Any]:
        entry = self.formatter.chat(lp)
        if self.bare_start[index]:
            self.bare_start[index] = False
            entry = self._without_dummy_space(entry, lp.token)
            top = zip(entry["top_logprobs"], lp.top, strict=True)
            entry["top_logprobs"] = [self._without_dummy_space(e, t) for e, (t, _) in top]
        return entry

    def _without_dummy_space(self, entry: dict[str, Any], token: int) -> dict[str, Any]:
        if token not in self.served.spaced_tokens:
            return entry
        return {**entry, "token": entry["token"][1:], "bytes": entry["bytes"][1:]}

    def response(self, choices: list[ChoiceTally]) -> dict[str, Any]:
        rendered = []
        for i, choice in enumerate(choices):
            entries = [self._entry(i, lp) for lp in choice.logprobs] if self.logprobs else None
            reason = choice.finish_reason
            calls = choice.tool_calls
            rendered.append(
                chat_choice(i, choice.text, reason, entries, calls, self.legacy_functions)
            )
        return self._body(rendered)

    def chunk_logprobs(self, event: TokenEvent) -> Any:
        return {"content": [self._entry(event.index, event.logprobs)]}

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        if called and reason in ("stop", "tool_calls"):  # the grammar's end is "tool_calls"
            return "function_call" if self.legacy_functions else "tool_calls"
        return reason

    def opening(self) -> list[bytes]:
        # OpenAI opens an answer that may be tool calls with a null content: "" would be a
        # (empty) content event for the openai package's stream helpers.
        content = None if self.streamers else ""
        return [
            self._chunk([chunk_choice(i, {"role": "assistant", "content": content}, None)])
            for i in range(self.n)
        ]

    def delta(self, delta: Delta) -> bytes:
        fields: dict[str, Any] = {}
        if delta.finish_reason is None and (delta.text or not delta.tool_calls):
            fields["content"] = delta.text
        if delta.tool_calls and self.legacy_functions:  # one call: its entries have index 0
            fields["function_call"] = delta.tool_calls[0]["function"]
        elif delta.tool_calls:
            fields["tool_calls"] = list(delta.tool_calls)
        choice = chunk_choice(delta.index, fields, delta.finish_reason, delta.logprobs)
        return self._chunk([choice])


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
            rendered.append(completion_choice(i, choice.text, choice.finish_reason, lp))
        return self._body(rendered)

    def chunk_logprobs(self, event: TokenEvent) -> Any:
        return self.formatter.completion([event.logprobs], [self.text_offsets[event.index]])

    def delta(self, delta: Delta) -> bytes:
        choice = completion_choice(delta.index, delta.text, delta.finish_reason, delta.logprobs)
        return self._chunk([choice])
