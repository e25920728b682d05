"""GET /: the built-in chat page, and GET /webui/{name}: the files it loads (off with
``--no-webui``; ``/`` is then unrouted, as before the page existed).

The files are package data (``llmserve/server/webui/``), read once and served from memory with
their content type. The page and its files are public — the page holds no secret, and it must
load to ask for the API key that its API calls then send. Every response carries a
Content-Security-Policy that allows only this server: no inline script or style and nothing from
elsewhere, so text a model writes cannot run as code in the page even if its renderer had a bug.
"""

from __future__ import annotations

import functools
from importlib import resources

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

ASSET_PREFIX = "/webui/"
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
    "object-src 'none'"
)
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # revalidate, so an upgraded server's page is the one shown
    "Cache-Control": "no-cache",
}


def is_page_path(path: str) -> bool:
    return path == "/" or path.startswith(ASSET_PREFIX)


@functools.cache
def _assets() -> dict[str, tuple[bytes, str]]:
    """File name → (content, content type), for the files of a type the page uses."""
    out: dict[str, tuple[bytes, str]] = {}
    for item in resources.files("llmserve.server.webui").iterdir():
        suffix = "." + item.name.rpartition(".")[2]
        if item.is_file() and suffix in _CONTENT_TYPES:
            out[item.name] = (item.read_bytes(), _CONTENT_TYPES[suffix])
    return out


def _serve(name: str) -> Response:
    asset = _assets().get(name)
    if asset is None:
        raise HTTPException(404, f"no file {ASSET_PREFIX}{name}")
    content, media_type = asset
    return Response(content, media_type=media_type, headers=_HEADERS)


async def page(_request: Request) -> Response:
    return _serve("index.html")


async def asset(request: Request) -> Response:
    return _serve(request.path_params["name"])


routes = [
    Route("/", page, methods=["GET"]),
    Route(ASSET_PREFIX + "{name}", asset, methods=["GET"]),
]
