"""The live chart page (``GET /``) and its static assets (``GET /assets/{path}``).

The page is plain files inside the package (``tradecanvas/serve/static/``: ``index.html``,
``chart.js``, ``chart.css`` and the vendored TradingView lightweight-charts under
``vendor/``, refreshed by ``scripts/vendor_lightweight_charts.sh``); there is no build step.
It reads the HTTP API and ``/ws/market`` at the origin it was served from (docs/chart.md).

Why a fixed table instead of a static-files mount: the files are read once, when the app is
built, into a mapping from their path under ``static/`` to their bytes and content type. A
request names a key of that mapping or gets 404, so no request path — ``..``, an encoded
slash, a symlink, an absolute path — ever reaches the file system.

Every answer carries a Content-Security-Policy that allows scripts, styles and connections
to this origin only: the page makes no external request, and nothing injected into it could
reach another host. The page has no write path (it never sends the ingest token; the POST
endpoint refuses it without one), and its WebSocket is subject to the ``Origin`` allow-list
like any other (``TRADE_CANVAS_WS_ALLOWED_ORIGINS``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final, final

import attrs
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tradecanvas.serve.http_validation import RequestRefused

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
INDEX: Final = "index.html"
ASSETS_PREFIX: Final = "/assets/"

CONTENT_TYPES: Final[Mapping[str, str]] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".LICENSE": "text/plain; charset=utf-8",
    "": "text/plain; charset=utf-8",  # VERSION
}

# 'self' in connect-src covers ws:// and wss:// at the same host and port (CSP level 3);
# lightweight-charts draws its attribution logo from a data: URL
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: Final[Mapping[str, str]] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # revalidated on every load, so a daemon upgrade is seen at once (the files are small)
    "Cache-Control": "no-cache",
}


@final
@attrs.frozen
class StaticFile:
    """One file of the page: its bytes and the Content-Type it is served with."""

    body: bytes
    content_type: str


def content_type_of(name: str) -> str | None:
    """The Content-Type for a file name, or None for a kind the page does not serve."""
    suffix = Path(name).suffix
    if suffix not in CONTENT_TYPES:
        return None
    return CONTENT_TYPES[suffix]


def load_static_files(root: Path = STATIC_DIR) -> dict[str, StaticFile]:
    """Every servable file under ``root``, by its ``/``-separated path relative to it.
    Hidden files and files of a kind without a Content-Type are left out."""
    files: dict[str, StaticFile] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        content_type = content_type_of(path.name)
        if content_type is not None:
            files[relative.as_posix()] = StaticFile(path.read_bytes(), content_type)
    return files


def chart_page_routes(files: Mapping[str, StaticFile] | None = None) -> list[BaseRoute]:
    """``GET /`` (the page) and ``GET /assets/{path}`` (its files) for the HTTP app; HEAD is
    answered too. An unknown asset is 404 ``not_found``, as for any unknown route."""
    table = dict(load_static_files() if files is None else files)
    if INDEX not in table:
        raise FileNotFoundError(f"the chart page is missing: no {INDEX} in {STATIC_DIR}")

    def answer(found: StaticFile) -> Response:
        return Response(found.body, media_type=found.content_type, headers=SECURITY_HEADERS)

    async def page(request: Request) -> Response:
        return answer(table[INDEX])

    async def asset(request: Request) -> Response:
        name = str(request.path_params["path"])
        found = table.get(name)
        if found is None:
            raise RequestRefused(
                404, "not_found", f"no such asset: {ASSETS_PREFIX}{name}"
            ) from None
        return answer(found)

    return [
        Route("/", page, methods=["GET"]),
        Route("/assets/{path:path}", asset, methods=["GET"]),
    ]
