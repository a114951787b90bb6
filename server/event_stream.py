"""`EventStreamResponse`: the ASGI response that sends one generation's event stream.

It listens for the client going away and cancels the generation at once (the engine drops the
sequence at its next step); it tells a client that stopped reading from a slow one, and gives
up on the first after `send_timeout` seconds; and however a stream ends (done, the engine's
error, the drain time at shutdown, a client too slow), the bytes the client has end
well-formed: the writer's events, then the terminator.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from starlette.types import Receive, Scope, Send

from mlx_mistral.batch import TokenEvent
from mlx_mistral.errors import MistralError

from .errors import InternalServerError, error_response
from .protocol import RequestTimeoutError
from .streaming import ResponseWriter, wait_for_disconnect

log = logging.getLogger("mlx_mistral.server")

T = TypeVar("T")

# Bytes per send: a quarter of the transport's 64 KiB high-water mark (see `_send_chunk`).
SEND_PIECE = 16 * 1024
FINAL_SEND_GRACE = 5.0  # seconds a cut stream's ending may wait for the socket


class EventStreamResponse:
    """An ASGI text/event-stream response bound to a generation.

    The status line waits for the stream's first item (a batch of events, or a keep-alive
    after `with_keepalive`'s interval), so a request refused before it started (the queue
    refused at shutdown, the engine gone) gets its real status, 503 and Retry-After, instead of
    a 200 carrying an error event. After that, whatever ends the stream ends it well-formed: an
    error from the engine (the drain time ran out) or a client too slow for `send_timeout` gets
    the writer's `failure` events and the terminator, as far as the socket still takes bytes.

    Args:
        writer: renders the stream (see `ResponseWriter.sse`); its `stats` are the request's
            access-log record.
        events: the request's event lists, keep-alive gaps included (see `with_keepalive`).
        cancel: stops the generation (`RequestHandle.cancel`); called when the client leaves,
            stops reading, or the stream ends early.
        send_timeout: seconds the client may go without reading `SEND_PIECE` bytes' worth
            before it counts as stopped (see `_send_chunk`).
    """

    def __init__(
        self,
        writer: ResponseWriter,
        events: AsyncIterator[list[TokenEvent] | None],
        *,
        cancel: Callable[[], None],
        send_timeout: float,
    ):
        self.writer = writer
        self.events = events
        self.cancel = cancel
        self.send_timeout = send_timeout
        self.stats = writer.stats
        self._unsent = b""  # the rest of the chunk being sent, should the send be cut

    async def _watch(self, receive: Receive) -> None:
        await wait_for_disconnect(receive)
        self.stats["disconnected"] = True
        self.cancel()  # at once: the engine drops the sequence before its next decode step

    async def _first(self, watcher: asyncio.Task) -> list[Any]:
        """The stream's first item, as a list of 0 or 1 items ([] if the events ended at once,
        None if the client left first). Raises the engine's MistralError."""
        first = asyncio.ensure_future(anext(self.events))
        try:
            await asyncio.wait({first, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not first.done():
                return None  # type: ignore[return-value]
            try:
                return [first.result()]
            except StopAsyncIteration:
                return []
        finally:
            if not first.done():  # wait for it to unwind: the events are closed after it
                first.cancel()
                await asyncio.wait({first})

    async def _send_chunk(self, send: Send, chunk: bytes, deadline: asyncio.Timeout) -> None:
        """Send `chunk` in pieces, each under its own deadline. A send waits only while the
        transport's buffer is over its high-water mark (64 KiB), until it is under its low one
        (16 KiB); so each wait ends once the client has read about 64 KiB, and a timeout means
        it read less than that in `send_timeout`: stopped, not slow. (One whole chunk, which
        can be hundreds of KiB once a slow reader's events are merged, would time out a client
        reading steadily but slowly.)"""
        loop = asyncio.get_running_loop()
        for start in range(0, len(chunk), SEND_PIECE):
            self._unsent = chunk[start:]
            deadline.reschedule(loop.time() + self.send_timeout)
            message = {"type": "http.response.body", "body": self._unsent[:SEND_PIECE]}
            await send({**message, "more_body": True})
            deadline.reschedule(None)
        self._unsent = b""

    async def _end(self, send: Send, exc: MistralError, grace: float) -> None:
        """End a stream cut short: what is left of the chunk being sent (a half-sent event would
        be garbage), the writer's failure events and the terminator, if the socket takes them
        within `grace` seconds."""
        body = self._unsent + b"".join(self.writer.failure(exc))
        try:
            async with asyncio.timeout(grace):
                await send({"type": "http.response.body", "body": body, "more_body": False})
        except (TimeoutError, OSError):
            log.warning("the client of stream %s took no more bytes", self.writer.id)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.create_task(self._watch(receive))
        finished = False
        try:
            try:
                first = await self._first(watcher)
            except MistralError as exc:  # refused before its first byte: the real status
                watcher.cancel()
                await error_response(exc)(scope, receive, send)
                finished = True
                return
            if first is None:  # the client left while the request waited
                return
            headers = [
                (b"content-type", self.writer.media_type),
                (b"cache-control", b"no-store"),
                (b"x-accel-buffering", b"no"),  # a reverse proxy must not hold chunks back
            ]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            finished = await self._stream(send, watcher, first)
        except asyncio.CancelledError:
            # uvicorn's own cut at shutdown, past --drain-timeout and its margin (a client that
            # stopped reading): say so in one line, without a traceback.
            self.stats["disconnected"] = True
            log.warning("stream %s cut by the shutdown", self.writer.id)
        finally:
            watcher.cancel()
            if not finished:
                self.cancel()
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _stream(self, send: Send, watcher: asyncio.Task, first: list[Any]) -> bool:
        """Send the stream; True once its terminator is sent."""
        body = self.writer.sse(_prepend(first, self.events))
        try:
            # One deadline, armed only while a send waits (wait_for would start a Task per chunk).
            async with asyncio.timeout(None) as deadline:
                async for chunk in body:
                    if watcher.done():
                        return False
                    await self._send_chunk(send, chunk, deadline)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return True
        except TimeoutError:
            self.stats["disconnected"] = True
            log.warning(
                "client stopped reading (less than %d KiB in %gs); generation cancelled",
                SEND_PIECE * 4 // 1024,
                self.send_timeout,
            )
            self.cancel()
            stopped = RequestTimeoutError(
                f"the client read too slowly (less than {SEND_PIECE * 4 // 1024} KiB in "
                f"{self.send_timeout:g}s, --send-timeout); the stream was cut"
            )
            await self._end(send, stopped, min(self.send_timeout, FINAL_SEND_GRACE))
        except Exception:
            log.exception("stream failed")
            failure = InternalServerError("the server hit an internal error; see its log")
            await self._end(send, failure, FINAL_SEND_GRACE)
        finally:
            await body.aclose()  # type: ignore[attr-defined]
        return False


async def _prepend(first: list[T], rest: AsyncIterator[T]) -> AsyncIterator[T]:
    for item in first:
        yield item
    async for item in rest:
        yield item
