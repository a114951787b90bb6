"""uvicorn's httptools protocol with the limits a server reachable by hostile clients needs.

uvicorn buffers a request's whole head (request line and headers) before the application sees
it, with no size limit (a 200 MiB header cost 200 MiB of memory and minutes of quadratic
parsing), and waits for a head or a body forever (300 silent sockets used up every file
descriptor). ASGI middleware runs too late for either, so this subclass, one per connection,
enforces them where the bytes arrive:

- size: a request target over `max_url_bytes` is refused with 414, a head over
  `max_header_bytes` with 431, while it streams in (at most one socket read past the limit is
  ever held), before the Host check and the API key;
- time: a connection that sends nothing for `idle_timeout` (fresh, or between keep-alive
  requests) is closed; a head not complete `header_timeout` after its first byte gets 408; a
  body that pauses for `body_timeout` is closed. Each is logged with the client's address;
- shape: parser errors (bad syntax, a bad URL) are answered in the API's JSON error shape,
  not uvicorn's plain text: the shape of the dialect of the target's path when as much of the
  target has arrived (`errors.dialect_of`; a 414's first 8 KiB say it), else OpenAI's;
  an absolute-form target (`GET http://host/path`) names the host itself (RFC 9112 3.2.2),
  so it replaces the Host header the guards check;
- half-close: a client that shuts down its sending side after a request (`nc -N`,
  `shutdown(SHUT_WR)`) still gets its response. (A client that left altogether is noticed at
  the next write, which for a stream is its next token or keep-alive comment.)

Use it with `uvicorn.Config(app, http=protocol_class(limits))`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Literal

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from mlx_mistral.errors import InvalidRequestError, MistralError

from .errors import dialect_of, error_body

log = logging.getLogger("mlx_mistral.server")

Phase = Literal["idle", "header", "body"]

LINGER_SECONDS = 2.0
"""After a refusal, how long input is still read (and dropped) before the socket closes."""


@dataclass(frozen=True)
class HttpLimits:
    """Per-connection limits (see the module docstring). Sizes in bytes, times in seconds."""

    max_url_bytes: int = 8 * 1024
    max_header_bytes: int = 32 * 1024
    idle_timeout: float = 15.0
    header_timeout: float = 60.0
    body_timeout: float = 60.0


class RequestTimeoutError(MistralError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class UriTooLongError(MistralError):
    status = 414
    type = "invalid_request_error"
    code = "uri_too_long"


class HeadersTooLargeError(MistralError):
    status = 431
    type = "invalid_request_error"
    code = "headers_too_large"


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the answer waits in `_refusal`."""


def target_path(target: bytes) -> str:
    """The path of a request target, whole or the part that arrived ("" for none): an
    origin-form target's, or an absolute-form one's after its authority."""
    if not target.startswith(b"/"):
        scheme, sep, rest = target.partition(b"://")
        target = b"/" + rest.partition(b"/")[2] if sep else b""
    return target.split(b"?", 1)[0].split(b"#", 1)[0].decode("latin-1")


def _address(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "-"


def protocol_class(limits: HttpLimits) -> type[HttpToolsProtocol]:
    """The protocol class to pass as `uvicorn.Config(http=...)`, bound to `limits`."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    limits = HttpLimits()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # between the end of one message and the end of the next head
        self._head_bytes = 0  # socket bytes fed while the head was still incomplete
        self._header_bytes = 0  # of complete header lines, counted exactly
        self._message_ended = False  # during one feed: a message completed in this chunk
        self._refusal: MistralError | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._phase: Phase | None = None
        self._discarding = False  # refused: the answer is sent, input is read and dropped

    # -- timers -----------------------------------------------------------------------------
    def _arm(self, phase: Phase) -> None:
        self._disarm()
        seconds = {
            "idle": self.limits.idle_timeout,
            "header": self.limits.header_timeout,
            "body": self.limits.body_timeout,
        }[phase]
        self._phase = phase
        self._timer = self.loop.call_later(seconds, self._timed_out, phase)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._phase = None, None

    def _timed_out(self, phase: Phase) -> None:
        self._timer = self._phase = None
        if self.transport.is_closing():
            return
        busy = self.cycle is not None and not self.cycle.response_complete
        if (phase == "header" and busy) or (phase == "body" and self.flow.read_paused):
            # Not the client's delay: a pipelined head waits for the response in progress,
            # and a paused body waits for the application to read it.
            self._arm(phase)
            return
        why = {
            "idle": f"no request within {self.limits.idle_timeout:g}s (--idle-timeout)",
            "header": f"request headers incomplete after {self.limits.header_timeout:g}s "
            "(--header-timeout)",
            "body": f"no request body bytes for {self.limits.body_timeout:g}s (--body-timeout)",
        }[phase]
        log.info("closed the connection from %s: %s", _address(self.client), why)
        if phase == "header":
            self._refuse(
                RequestTimeoutError(
                    f"the request headers did not arrive within {self.limits.header_timeout:g}s"
                )
            )
        else:
            self.transport.close()

    # -- connection events ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("idle")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def eof_received(self) -> bool | None:
        # A half-close after a complete request still wants the answer: keep the transport
        # open for writing (returning True) and close once the response is sent.
        if self._discarding:
            return None
        if self.cycle is not None and not self.cycle.response_complete and not self._in_body:
            self.cycle.keep_alive = False
            return True
        return None  # nothing to answer (or a body that can never complete): close

    @property
    def _in_body(self) -> bool:
        return self._phase == "body"

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        self._unset_keepalive_if_required()
        if self._in_head and self._phase != "header":
            self._arm("header")  # the first byte of a head starts its clock
        self._message_ended = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            self._refuse(self._refusal or InvalidRequestError(f"invalid HTTP request: {exc}"))
            return
        if self._in_head and not self._message_ended:
            # A head that has not ended is counted while it streams in, so a huge header
            # line is refused before it is buffered (the parser hands a header over only
            # when it is complete; `on_header` counts those exactly).
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(self._too_large())

    def _too_large(self) -> HeadersTooLargeError:
        return HeadersTooLargeError(
            f"the request headers are larger than the server's limit of "
            f"{self.limits.max_header_bytes} bytes"
        )

    def _refuse(self, error: MistralError) -> None:
        """Answer `error` as the API's JSON error body, then close the connection."""
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a response is being written: nothing may interleave
            return
        if error.status >= 500 or error.status in (408, 414, 431):
            log.info("refused a request from %s: %s", _address(self.client), error.message)
        path = target_path(getattr(self, "url", b""))  # none before the first request begins
        body = json.dumps(error_body(error, dialect_of(path))).encode()
        head = [STATUS_LINE[error.status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        # A lingering close, as nginx does: closing a socket with unread input resets the
        # connection, and the reset can destroy the answer before a client still sending
        # reads it. So end our side, discard what still comes for a moment, then close.
        self.transport.write_eof()
        self._discarding = True
        self._timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _stop(self, error: MistralError) -> None:
        self._refusal = error
        raise _Refused(error.message)

    # -- parser callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)  # called piece by piece as the target arrives
        if len(self.url) > self.limits.max_url_bytes:
            self._stop(
                UriTooLongError(
                    f"the request target is longer than the server's limit of "
                    f"{self.limits.max_url_bytes} bytes"
                )
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if len(self.url) + self._header_bytes > self.limits.max_header_bytes:
            self._stop(self._too_large())
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._disarm()
        if not self.url.startswith((b"/", b"*")):
            self._use_target_authority()
        self._arm("body")  # disarmed by on_message_complete, at once when there is no body
        super().on_headers_complete()

    def _use_target_authority(self) -> None:
        """RFC 9112 3.2.2: with an absolute-form target the server uses the target's host and
        ignores the Host header, so the Host check must see the target's."""
        scheme, sep, rest = self.url.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            self._stop(InvalidRequestError("the request target must be a path, like /v1/models"))
        authority = rest.split(b"/", 1)[0].split(b"?", 1)[0].split(b"#", 1)[0]
        self.headers[:] = [(k, v) for k, v in self.headers if k != b"host"]
        self.headers.append((b"host", authority))  # `@` (userinfo) fails the Host check

    def on_body(self, body: bytes) -> None:
        self._arm("body")  # the body clock measures the gap between two pieces
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_head = True
        self._message_ended = True
        super().on_message_complete()
