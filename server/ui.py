"""The server's own page: a chat with the served model and a live status view (docs/ui.md).

Plain files from `mlx_mistral.server.page` (HTML, CSS, JavaScript modules; no build step, no
CDN), served at `/` to a browser and under `/ui/`. The page holds no data: everything it shows
comes through the API with the user's key, so the shell and its assets are the only paths served
without one (`is_page_request`). A strict Content-Security-Policy keeps model output inert and
the page out of other sites' frames. `--no-ui` turns it off.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Scope

from .ollama import running

ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "status.js": "text/javascript; charset=utf-8",
    "render.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
"""The page's assets by name (nothing else under /ui/ is served)."""

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; font-src 'none'; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _accepts_html(scope: Scope) -> bool:
    for key, value in scope.get("headers", ()):
        if key == b"accept":
            return b"text/html" in value
    return False


def is_page_request(scope: Scope) -> bool:
    """A GET for the page's shell (`/` from a browser) or one of its assets: served without
    the API key, since they hold nothing but code (the page asks the user for the key)."""
    if scope.get("method") not in ("GET", "HEAD"):
        return False
    path = scope.get("path", "")
    if path == "/":
        return _accepts_html(scope)
    return path.startswith("/ui/") and path[4:] in ASSETS


def _read(name: str) -> bytes:
    return resources.files("mlx_mistral.server.page").joinpath(name).read_bytes()


def ui_routes() -> list[Route]:
    """`/` (the page to a browser; Ollama's "Ollama is running" to anything else, as without
    the page) and `/ui/{name}` (its assets)."""
    index = _read("index.html")
    assets = {name: (_read(name), kind) for name, kind in ASSETS.items()}

    async def page(request: Request) -> Response:
        if not _accepts_html(request.scope):
            return await running(request)
        return Response(index, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    async def asset(request: Request) -> Response:
        found = assets.get(request.path_params["name"])
        if found is None:
            return Response(b"not found\n", status_code=404, media_type="text/plain")
        return Response(found[0], media_type=found[1], headers=PAGE_HEADERS)

    return [
        Route("/", page, methods=["GET", "HEAD"]),
        Route("/ui/{name}", asset, methods=["GET", "HEAD"]),
    ]
