"""Pure ASGI middleware that guards a local server: Host allow-list, API key, body size.

Order, outermost first (see `build_middleware`): Host check, then CORS (when origins are
configured; else a preflight gets a 204 that grants nothing: a browser's preflight carries no
key), then the API key, then the body limit. Each refusal is sent before any handler runs, as
an error body in the shape of the path's dialect (`errors.send_error`).
"""

from __future__ import annotations

import hmac

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlx_mistral.errors import AuthenticationError, InvalidRequestError, PermissionDeniedError

from .config import ServerConfig, host_allowed, host_name
from .errors import PayloadTooLargeError, send_error
from .ui import is_page_request

UNAUTHENTICATED_PATHS = frozenset({"/health"})
"""Paths served without a key: liveness probes carry none. /health tells a caller without the
key only whether the server is up (see `is_authenticated`)."""

AUTHENTICATED = "mlx_mistral.authenticated"
"""Scope key set by `ApiKeyAuth`: True when the request may see more than a liveness answer."""


def is_authenticated(scope: Scope) -> bool:
    """Whether this request carried the key (or no key is configured)."""
    return bool(scope.get(AUTHENTICATED))


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


class HostFilter:
    """403 to any Host header not on the allow-list (DNS rebinding: a hostile page whose name
    resolves to 127.0.0.1 still sends its own name as Host); 400 to two Host headers or one
    that is not `name[:port]` (a lenient split would find an allowed name in either)."""

    def __init__(self, app: ASGIApp, *, allowed: frozenset[str]):
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hosts = [value for key, value in scope.get("headers", ()) if key == b"host"]
        if len(hosts) > 1:  # RFC 9112 3.2: which one would the check have meant?
            await send_error(
                scope, send, InvalidRequestError("more than one Host header", code="invalid_host")
            )
            return
        host = hosts[0].decode("latin-1") if hosts else ""
        if "*" in self.allowed:
            allowed = True
        elif not host:
            allowed = False
        else:
            try:
                allowed = host_allowed(host_name(host), self.allowed)
            except ValueError as exc:
                await send_error(
                    scope,
                    send,
                    InvalidRequestError(f"invalid Host header: {exc}", code="invalid_host"),
                )
                return
        if not allowed:
            shown = host if host else "(none)"
            await send_error(
                scope,
                send,
                PermissionDeniedError(
                    f"Host {shown[:100]!r} is not allowed; start the server with "
                    "--allowed-hosts to accept it",
                    code="host_not_allowed",
                ),
            )
            return
        await self.app(scope, receive, send)


class PreflightWithoutCors:
    """204 with no Access-Control-Allow-* header to a CORS preflight when no origin is allowed.

    A browser then refuses the cross-origin call itself, exactly as with a 405, but clients and
    proxies that probe with OPTIONS see a server that answers (the routes know only GET and
    POST, so the router would say 405).
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "OPTIONS"
            and _header(scope, b"origin") is not None
            and _header(scope, b"access-control-request-method") is not None
        ):
            headers = [(b"allow", b"GET, POST, OPTIONS"), (b"content-length", b"0")]
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send)


class ApiKeyAuth:
    """401 unless the request carries `Authorization: Bearer <key>` or `x-api-key: <key>` (the
    anthropic SDK's header), compared in constant time.

    With no key configured every request passes, whatever token it carries (clients such as the
    openai package always send one).
    """

    def __init__(self, app: ASGIApp, *, api_key: str | None, page: bool = False):
        self.app = app
        self.key = api_key.encode() if api_key is not None else None
        self.page = page  # the page's shell and assets load without the key (they ask for it)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = _header(scope, b"authorization")
        api_key = _header(scope, b"x-api-key")
        if self.key is None or self._matches(header, api_key):
            scope[AUTHENTICATED] = True
            await self.app(scope, receive, send)
            return
        if scope["path"] in UNAUTHENTICATED_PATHS or (self.page and is_page_request(scope)):
            await self.app(scope, receive, send)
            return
        if header is None and api_key is None:
            message = "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
        else:
            message = "invalid API key"
        await send_error(scope, send, AuthenticationError(message), {"WWW-Authenticate": "Bearer"})

    def _matches(self, header: bytes | None, api_key: bytes | None) -> bool:
        if self.key is None:
            return False
        scheme, _, token = (header or b"").partition(b" ")
        tokens = [token.strip()] if scheme.lower() == b"bearer" else []
        tokens += [] if api_key is None else [api_key.strip()]
        return any(hmac.compare_digest(t, self.key) for t in tokens)


class BodyLimit:
    """413 for a body over `max_bytes`: refused up front by Content-Length, and counted as it
    streams in (a chunked body has no length to check)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"the request body is larger than the server's limit of {self.max_bytes} bytes"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await send_error(
                    scope, send, InvalidRequestError("the Content-Length header is not a number")
                )
                return
            if declared > self.max_bytes:
                await send_error(scope, send, self._too_large(), {"Connection": "close"})
                return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()  # rendered by the handler reading the body
            return message

        await self.app(scope, counted, send)


def build_middleware(config: ServerConfig) -> list[Middleware]:
    """The guard stack for `config`, outermost first."""
    stack = [Middleware(HostFilter, allowed=config.host_allow_list)]
    if config.cors_origins:
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.cors_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["Authorization", "Content-Type", "X-Api-Key", "Anthropic-Version"],
                max_age=600,
            )
        )
    else:
        stack.append(Middleware(PreflightWithoutCors))
    stack.append(Middleware(ApiKeyAuth, api_key=config.api_key, page=config.ui))
    stack.append(Middleware(BodyLimit, max_bytes=config.max_body_bytes))
    return stack
