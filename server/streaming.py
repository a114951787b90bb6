"""Engine events -> one JSON response, or a text/event-stream of chunks ending in `data: [DONE]`.

`ResponseWriter` turns the `TokenEvent`s of one request into either shape (chat or legacy
completions); for a chat request with tools it reads the calls out of the text with a
`ToolCallStreamer` per choice, and one body adds up what the stream would have sent
(`assemble_tool_calls`). `EventStreamResponse` is the ASGI response that sends the stream: it
listens for the client going away and cancels the generation at once (the engine drops the
sequence at its next step), and it gives up on a client that stops reading for `send_timeout`
seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from starlette.types import Receive, Scope, Send

from mlx_mistral.batch import TokenEvent
from mlx_mistral.errors import MistralError
from mlx_mistral.tools.parsing import StreamDelta, ToolCallStreamer, assemble_tool_calls

from .errors import InternalServerError, error_event
from .schemas import (
    LogprobFormatter,
    chat_choice,
    chunk_choice,
    completion_choice,
    envelope,
    new_id,
    now,
    usage,
)

log = logging.getLogger("mlx_mistral.server")

T = TypeVar("T")

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),  # a reverse proxy must not hold chunks back
]


def sse_data(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


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


class ResponseWriter:
    """Builds the answer to one request from its engine events.

    Args:
        chat: chat.completion objects (else text_completion).
        model: the served model's name.
        n: number of choices.
        logprobs: whether the request asked for logprobs.
        include_usage: streaming only: send a usage chunk before [DONE].
        prices: (per prompt token, per completion token) for usage.estimated_cost.
        formatter: renders logprobs.
        stats: the request's access-log record (token counts, time to first token).
        call_ids: chat with tools: per choice, the ids its grammar forces into its calls
            (`GrammarConstraint.call_ids`); None when answers hold no tool calls.
    """

    def __init__(
        self,
        *,
        chat: bool,
        model: str,
        n: int,
        logprobs: bool,
        include_usage: bool,
        prices: tuple[float, float],
        formatter: LogprobFormatter,
        stats: dict[str, Any],
        call_ids: list[tuple[str, ...]] | None = None,
    ):
        self.chat = chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = now()
        self.model = model
        self.n = n
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.prices = prices
        self.formatter = formatter
        self.stats = stats
        self.prompt_tokens = 0
        self.completion_tokens = [0] * n
        self.text_offsets = [0] * n  # completions logprobs count characters per choice
        self.call_ids = call_ids

    def _record(self, event: TokenEvent) -> None:
        self.prompt_tokens = max(self.prompt_tokens, event.prompt_tokens)
        self.completion_tokens[event.index] = event.completion_tokens
        if event.token is not None and "ttft" not in self.stats:
            self.stats["ttft"] = time.perf_counter() - self.stats.get("start", time.perf_counter())
        self.stats["prompt_tokens"] = self.prompt_tokens
        self.stats["completion_tokens"] = sum(self.completion_tokens)

    def _usage(self) -> dict[str, Any]:
        return usage(
            self.prompt_tokens,
            sum(self.completion_tokens),
            prompt_price=self.prices[0],
            completion_price=self.prices[1],
        )

    def _has_logprob(self, event: TokenEvent) -> bool:
        # The token that ends a choice with "stop" (</s>, or the end of a stop string) is not
        # part of the content, so it gets no logprob entry.
        return self.logprobs and event.logprobs is not None and event.finish_reason != "stop"

    def _token_logprobs(self, event: TokenEvent) -> Any:
        """The logprobs field of one streamed chunk, or None."""
        if not self._has_logprob(event):
            return None
        if self.chat:
            return {"content": [self.formatter.chat(event.logprobs)]}
        return self.formatter.completion([event.logprobs], [self.text_offsets[event.index]])

    async def collect(self, events: AsyncIterator[TokenEvent]) -> dict[str, Any]:
        """The whole response object. Raises the engine's MistralError if it fails."""
        texts: list[list[str]] = [[] for _ in range(self.n)]
        finish: list[str | None] = [None] * self.n
        entries: list[list[Any]] = [[] for _ in range(self.n)]
        offsets: list[list[int]] = [[] for _ in range(self.n)]  # completions: as the stream counts
        async for event in events:
            if event.finish_reason == "cancelled":
                continue
            self._record(event)
            if self._has_logprob(event):
                lp = event.logprobs
                entries[event.index].append(self.formatter.chat(lp) if self.chat else lp)
                offsets[event.index].append(self.text_offsets[event.index])
            texts[event.index].append(event.text)
            self.text_offsets[event.index] += len(event.text)
            if event.finish_reason is not None:
                finish[event.index] = event.finish_reason
        choices = []
        for i in range(self.n):
            text = "".join(texts[i])
            if self.chat:
                calls = None
                if self.call_ids is not None:  # exactly what the stream would have sent
                    text, calls = assemble_tool_calls(texts[i], self.call_ids[i])
                reason = "tool_calls" if calls and finish[i] == "stop" else finish[i]
                choices.append(
                    chat_choice(i, text, reason, entries[i] if self.logprobs else None, calls)
                )
            else:
                lp = self.formatter.completion(entries[i], offsets[i]) if self.logprobs else None
                choices.append(completion_choice(i, text, finish[i], lp))
        kind = "chat.completion" if self.chat else "text_completion"
        return envelope(kind, self.id, self.created, self.model, choices, self._usage())

    def _chunk(self, choices: list[dict[str, Any]]) -> bytes:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        chunk = envelope(kind, self.id, self.created, self.model, choices)
        if self.include_usage:  # as OpenAI: null on every chunk but the last
            chunk["usage"] = None
        return sse_data(chunk)

    def _delta(
        self,
        index: int,
        text: str,
        finish: str | None,
        logprobs: Any,
        tool_calls: tuple[dict[str, Any], ...] = (),
    ) -> bytes:
        if self.chat:
            delta: dict[str, Any] = {}
            if finish is None and (text or not tool_calls):
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = list(tool_calls)
            return self._chunk([chunk_choice(index, delta, finish, logprobs)])
        return self._chunk([completion_choice(index, text, finish, logprobs)])

    def _merge_logprobs(self, parts: list[Any]) -> Any:
        """One chunk's logprobs from several tokens' (their lists concatenated)."""
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return {key: [entry for part in parts for entry in part[key]] for key in parts[0]}

    async def sse(self, batches: AsyncIterator[list[TokenEvent] | None]) -> AsyncIterator[bytes]:
        """The event stream from lists of events (`RequestHandle.batches`); None items (see
        `with_keepalive`) become SSE comments.

        The events of one list that belong to one choice become one chunk: when the model
        outruns the server (a small model, many streams) a chunk carries several tokens, and
        the text is the same. Tool-call deltas stay one chunk per token.
        """
        streamers = [ToolCallStreamer(call_ids=ids) for ids in self.call_ids or ()]
        called = [False] * self.n
        if self.chat:
            for i in range(self.n):
                yield self._chunk([chunk_choice(i, {"role": "assistant", "content": ""}, None)])
        try:
            async for batch in batches:
                if batch is None:
                    yield KEEPALIVE
                    continue
                pending: dict[int, tuple[list[str], list[Any]]] = {}  # choice -> texts, logprobs

                def flush(index: int) -> bytes | None:
                    texts, logprobs = pending.pop(index, ((), ()))
                    text, merged = "".join(texts), self._merge_logprobs(list(logprobs))
                    return self._delta(index, text, None, merged) if text or merged else None

                for event in batch:
                    if event.finish_reason == "cancelled":
                        continue
                    self._record(event)
                    logprobs = self._token_logprobs(event)
                    text, calls = event.text, ()
                    if streamers:  # call text becomes tool_calls deltas, never content
                        delta = streamers[event.index].feed(text)
                        if event.finish_reason is not None:
                            last = streamers[event.index].finish()
                            delta = StreamDelta(
                                delta.content + last.content, delta.tool_calls + last.tool_calls
                            )
                        text, calls = delta.content, delta.tool_calls
                        called[event.index] |= bool(calls)
                        if text or calls or logprobs is not None:
                            yield self._delta(event.index, text, None, logprobs, calls)
                    else:
                        texts, parts = pending.setdefault(event.index, ([], []))
                        texts.append(text)
                        if logprobs is not None:
                            parts.append(logprobs)
                    self.text_offsets[event.index] += len(event.text)
                    if event.finish_reason is not None:
                        chunk = flush(event.index)
                        if chunk is not None:
                            yield chunk
                        reason = event.finish_reason
                        if called[event.index] and reason == "stop":
                            reason = "tool_calls"
                        yield self._delta(event.index, "", reason, None)
                for index in list(pending):
                    chunk = flush(index)
                    if chunk is not None:
                        yield chunk
        except MistralError as exc:
            log.warning("stream %s failed: %s", self.id, exc.message)
            yield error_event(exc)
        else:
            if self.include_usage:
                kind = "chat.completion.chunk" if self.chat else "text_completion"
                yield sse_data(envelope(kind, self.id, self.created, self.model, [], self._usage()))
        finally:
            aclose = getattr(batches, "aclose", None)
            if aclose is not None:
                await aclose()
        yield DONE


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client has gone away (call after the request body was read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class EventStreamResponse:
    """An ASGI text/event-stream response bound to a generation.

    Args:
        body: the SSE byte chunks (see `ResponseWriter.sse`).
        cancel: stops the generation (`RequestHandle.cancel`); called when the client leaves,
            stops reading, or the stream ends early.
        send_timeout: seconds one chunk may wait for a client that is not reading.
        stats: the request's access-log record.
    """

    def __init__(
        self,
        body: AsyncIterator[bytes],
        *,
        cancel: Callable[[], None],
        send_timeout: float,
        stats: dict[str, Any],
    ):
        self.body = body
        self.cancel = cancel
        self.send_timeout = send_timeout
        self.stats = stats

    async def _watch(self, receive: Receive) -> None:
        await wait_for_disconnect(receive)
        self.stats["disconnected"] = True
        self.cancel()  # at once: the engine drops the sequence before its next decode step

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        watcher = asyncio.create_task(self._watch(receive))
        finished = False
        loop = asyncio.get_running_loop()
        try:
            # One deadline, armed only while a send waits (wait_for would start a Task per chunk).
            async with asyncio.timeout(None) as deadline:
                async for chunk in self.body:
                    if watcher.done():
                        return
                    deadline.reschedule(loop.time() + self.send_timeout)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    deadline.reschedule(None)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            finished = True
        except TimeoutError:
            self.stats["disconnected"] = True
            log.warning("client stopped reading for %.0fs; generation cancelled", self.send_timeout)
        except Exception:
            log.exception("stream failed")
            try:
                await send(
                    {
                        "type": "http.response.body",
                        "more_body": False,
                        "body": error_event(
                            InternalServerError("the server hit an internal error; see its log")
                        )
                        + DONE,
                    }
                )
            except OSError as exc:
                log.warning("could not report the failure to the client: %s", exc)
        finally:
            watcher.cancel()
            if not finished:
                self.cancel()
            await self.body.aclose()  # type: ignore[attr-defined]
