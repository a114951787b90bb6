"""From engine events to an HTTP answer: what every dialect's writer shares, and the stream.

`ResponseWriter` is the base of each endpoint's writer (`openai_writers` has OpenAI's chat and
legacy completions): it consumes one request's `TokenEvent`s into one body (`collect`) or a
stream of chunks (`sse`), and its subclass renders only the wire format. `with_keepalive` marks
the waits before the first token, so a stream can send keep-alives while a long prompt is
prefilled. `event_stream.EventStreamResponse` sends a stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from starlette.types import Receive

from mlx_mistral.batch import TokenEvent
from mlx_mistral.engine import RequestHandle
from mlx_mistral.errors import MistralError
from mlx_mistral.sampling.params import SamplingParams
from mlx_mistral.tools.parsing import StreamDelta, ToolCallStreamer, assemble_tool_calls

from .activity import Activity
from .schemas import LogprobFormatter, new_id, now

if TYPE_CHECKING:
    from mlx_mistral.sampling.sampler import TokenLogprobs

log = logging.getLogger("mlx_mistral.server")

T = TypeVar("T")

KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients skip it, proxies see traffic


async def with_keepalive(events: AsyncIterator[T], interval: float) -> AsyncIterator[T | None]:
    """Yield the items of `events`, and None whenever `interval` seconds pass before the first
    one (so the caller can send a keep-alive while the request waits for memory or its long
    prompt is prefilled). After the first item the rest pass straight through: tokens then come
    every decode step, and a timer per token would cost the event loop more than the token.

    The pending `__anext__` is waited on, never cancelled by the timeout, so no item is lost.
    """
    iterator = events.__aiter__()
    pending: asyncio.Future = asyncio.ensure_future(iterator.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if done:
                break
            yield None
        try:
            first = pending.result()
        except StopAsyncIteration:
            return
    finally:
        pending.cancel()
    try:
        yield first
        async for item in iterator:
            yield item
    finally:  # the iterator is ours now: close it when we are closed (a client that left)
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


@dataclass(frozen=True)
class Served:
    """What every answer of this server states: the model's name, its prices, its token texts.

    Attributes:
        model: the served model's name.
        prices: (per prompt token, per completion token) for usage.estimated_cost.
        formatter: renders logprobs.
        spaced_tokens: the ids of pieces that start with SentencePiece's space, which an
            answer's first token drops (its dummy prefix), in its logprobs as in its text.
    """

    model: str
    prices: tuple[float, float]
    formatter: LogprobFormatter
    spaced_tokens: frozenset[int] = frozenset()
    activity: Activity = field(default_factory=Activity)  # tokens as they come, for /v1/status


@dataclass(frozen=True)
class Delta:
    """What one streamed chunk says about choice `index`."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    logprobs: Any = None  # as `chunk_logprobs` renders them, merged over the chunk's tokens
    tool_calls: tuple[dict[str, Any], ...] = ()


def one_entry_per_index(entries: tuple[dict[str, Any], ...]) -> list[tuple[dict[str, Any], ...]]:
    """Tool-call delta entries in consecutive groups that each hold at most one entry per call
    `index`, in order: OpenAI never sends two entries of one call in one chunk, and clients
    (instructor's partial parser) keep only one of them."""
    groups: list[list[dict[str, Any]]] = []
    for entry in entries:
        if not groups or any(e["index"] == entry["index"] for e in groups[-1]):
            groups.append([])
        groups[-1].append(entry)
    return [tuple(group) for group in groups]


@dataclass
class ChoiceTally:
    """One choice of a whole (non-streamed) answer, as the events built it up."""

    texts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # tokens that get an entry
    offsets: list[int] = field(default_factory=list)  # where each of those tokens' text starts
    # Once complete: the content, and the tool calls read out of the text (None: not read).
    text: str = ""
    tool_calls: list[dict[str, Any]] | None = None


class ResponseWriter(ABC):
    """Builds the answer to one request from its engine events; one subclass per dialect.

    This base does what every dialect shares: it consumes the engine's events (cancelled ones
    skipped), counts tokens for usage and the access log, tallies each choice, reads tool calls
    out of the text (a `ToolCallStreamer` per choice; one body adds up what the stream would
    have sent, `assemble_tool_calls`), sends keep-alives while the first token is awaited
    (`with_keepalive` items that are None), merges the tokens of one choice that arrive
    together into one delta, and ends a failed stream with the dialect's error event. A
    subclass renders only its wire format: `response` (the whole body), `delta` (one streamed
    chunk), `chunk_logprobs`, `finish_reason`, `opening`, `closing` and `failure`.

    Args:
        served: the server's model name, prices and logprob formatter.
        params: the request's sampling parameters (`n` choices; `logprobs`).
        include_usage: streaming only: send a usage chunk at the end.
        stats: the request's access-log record (token counts, time to first token).
        call_ids: a request with tools: per choice, the ids its grammar forces into its calls
            (`GrammarConstraint.call_ids`); None when answers hold no tool calls.
    """

    id_prefix: ClassVar[str]  # of the answer's id
    media_type = b"text/event-stream; charset=utf-8"
    keepalive = KEEPALIVE

    def __init__(
        self,
        served: Served,
        params: SamplingParams,
        *,
        include_usage: bool,
        stats: dict[str, Any],
        call_ids: list[tuple[str, ...]] | None = None,
    ):
        self.id = new_id(self.id_prefix)
        self.created = now()
        self.served = served
        self.formatter = served.formatter
        self.n = params.n
        self.logprobs = params.logprobs
        self.include_usage = include_usage
        self.stats = stats
        self.prompt_tokens = 0
        self.cached_tokens = 0  # prompt tokens whose KV came from the prefix cache
        self.completion_tokens = [0] * self.n
        self.text_offsets = [0] * self.n  # characters sent so far, per choice
        self.call_ids = call_ids
        self.streamers = [ToolCallStreamer(call_ids=ids) for ids in call_ids or ()]
        self.called = [False] * self.n  # streamed: the choice has sent a tool call
        # Call text becomes tool-call deltas, one chunk per token, never content.
        self.merges_tokens = not self.streamers

    # -- what a dialect renders ------------------------------------------------------------------
    @abstractmethod
    def response(self, choices: list[ChoiceTally]) -> dict[str, Any]:
        """The whole body of a non-streamed answer."""

    @abstractmethod
    def delta(self, delta: Delta) -> bytes:
        """One streamed chunk."""

    @abstractmethod
    def chunk_logprobs(self, event: TokenEvent) -> Any:
        """The logprobs of one token as a streamed chunk carries them (see `_merge_logprobs`)."""

    def opening(self) -> list[bytes]:
        """What the stream sends before the first event."""
        return []

    def closing(self) -> list[bytes]:
        """What ends a stream that succeeded."""
        return []

    @abstractmethod
    def failure(self, exc: MistralError) -> list[bytes]:
        """What ends a stream that failed with `exc`."""

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        """The finish reason the dialect reports for the engine's `reason`, for a choice that
        made tool calls (`called`) or not."""
        return reason

    # -- the shared part -------------------------------------------------------------------------
    def _record(self, event: TokenEvent) -> None:
        before = (self.prompt_tokens, self.cached_tokens, self.completion_tokens[event.index])
        self.prompt_tokens = max(self.prompt_tokens, event.prompt_tokens)
        self.cached_tokens = max(self.cached_tokens, event.cached_tokens)
        self.completion_tokens[event.index] = event.completion_tokens
        self.served.activity.record(
            prompt=self.prompt_tokens - before[0],
            cached=self.cached_tokens - before[1],
            generated=max(0, event.completion_tokens - before[2]),
        )
        if event.token is not None and "ttft" not in self.stats:
            self.stats["ttft"] = time.perf_counter() - self.stats.get("start", time.perf_counter())
        self.stats["prompt_tokens"] = self.prompt_tokens
        self.stats["completion_tokens"] = sum(self.completion_tokens)

    def _has_logprob(self, event: TokenEvent) -> bool:
        # The token that ends a choice with "stop" (</s>, or the end of a stop string) is not
        # part of the content, so it gets no logprob entry.
        return self.logprobs and event.logprobs is not None and event.finish_reason != "stop"

    async def collect(self, events: AsyncIterator[TokenEvent]) -> dict[str, Any]:
        """The whole response object. Raises the engine's MistralError if it fails."""
        choices = [ChoiceTally() for _ in range(self.n)]
        async for event in events:
            if event.finish_reason == "cancelled":
                continue
            self._record(event)
            choice = choices[event.index]
            if self._has_logprob(event):
                choice.logprobs.append(event.logprobs)
                choice.offsets.append(self.text_offsets[event.index])
            choice.texts.append(event.text)
            self.text_offsets[event.index] += len(event.text)
            if event.finish_reason is not None:
                choice.finish_reason = event.finish_reason
        for i, choice in enumerate(choices):
            choice.text = "".join(choice.texts)
            if self.call_ids is not None:  # exactly what the stream would have sent
                choice.text, choice.tool_calls = assemble_tool_calls(choice.texts, self.call_ids[i])
            choice.finish_reason = self.finish_reason(choice.finish_reason, bool(choice.tool_calls))
        return self.response(choices)

    async def collect_while_connected(self, handle: RequestHandle, receive: Receive) -> dict:
        """`collect` the request's events, cancelling the generation if the client leaves."""

        def on_disconnect(task: asyncio.Task) -> None:
            if not task.cancelled():
                self.stats["disconnected"] = True
                handle.cancel()

        watcher = asyncio.create_task(wait_for_disconnect(receive))
        watcher.add_done_callback(on_disconnect)
        try:
            return await self.collect(handle)
        finally:
            watcher.cancel()

    @staticmethod
    def _merge_logprobs(parts: list[Any]) -> Any:
        """One chunk's logprobs from several tokens' (their lists concatenated)."""
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return {key: [entry for part in parts for entry in part[key]] for key in parts[0]}

    def _stream_content(self, event: TokenEvent) -> tuple[str, tuple[dict[str, Any], ...]]:
        """The streamed text of one event and the tool-call deltas read out of it."""
        if not self.streamers:
            return event.text, ()
        streamer = self.streamers[event.index]
        delta = streamer.feed(event.text)
        if event.finish_reason is not None:
            last = streamer.finish()
            delta = StreamDelta(delta.content + last.content, delta.tool_calls + last.tool_calls)
        self.called[event.index] |= bool(delta.tool_calls)
        return delta.content, delta.tool_calls

    def _chunks(self, batch: list[TokenEvent]) -> Iterator[bytes]:
        """The chunks for one list of events: the events of one choice become one chunk (when
        the model outruns the server a chunk carries several tokens, and the text is the same)
        unless the writer streams each token on its own (`merges_tokens`)."""
        pending: dict[int, tuple[list[str], list[Any]]] = {}  # choice -> texts, logprobs

        def flush(index: int) -> bytes | None:
            texts, logprobs = pending.pop(index, ((), ()))
            text, merged = "".join(texts), self._merge_logprobs(list(logprobs))
            return self.delta(Delta(index, text, logprobs=merged)) if text or merged else None

        for event in batch:
            if event.finish_reason == "cancelled":
                continue
            self._record(event)
            # Before the text is counted: a completions entry names where its token starts.
            logprobs = self.chunk_logprobs(event) if self._has_logprob(event) else None
            text, calls = self._stream_content(event)
            if self.merges_tokens:
                texts, parts = pending.setdefault(event.index, ([], []))
                texts.append(text)
                if logprobs is not None:
                    parts.append(logprobs)
            elif text or calls or logprobs is not None:
                # The text and logprobs go with the first group of call entries.
                groups = one_entry_per_index(calls) or [()]
                yield self.delta(Delta(event.index, text, logprobs=logprobs, tool_calls=groups[0]))
                for group in groups[1:]:
                    yield self.delta(Delta(event.index, tool_calls=group))
            self.text_offsets[event.index] += len(event.text)
            if event.finish_reason is not None:
                chunk = flush(event.index)
                if chunk is not None:
                    yield chunk
                reason = self.finish_reason(event.finish_reason, self.called[event.index])
                yield self.delta(Delta(event.index, finish_reason=reason))
        for index in list(pending):
            chunk = flush(index)
            if chunk is not None:
                yield chunk

    async def sse(self, batches: AsyncIterator[list[TokenEvent] | None]) -> AsyncIterator[bytes]:
        """The event stream from lists of events (`RequestHandle.batches`); None items (see
        `with_keepalive`) become keep-alives."""
        for chunk in self.opening():
            yield chunk
        try:
            async for batch in batches:
                if batch is None:
                    yield self.keepalive
                    continue
                for chunk in self._chunks(batch):
                    yield chunk
        except MistralError as exc:
            log.warning("stream %s failed: %s", self.id, exc.message)
            ending = self.failure(exc)
        else:
            ending = self.closing()
        finally:
            aclose = getattr(batches, "aclose", None)
            if aclose is not None:
                await aclose()
        for chunk in ending:
            yield chunk


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client has gone away (call after the request body was read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
