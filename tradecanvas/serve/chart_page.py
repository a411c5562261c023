"""The live chart page (``GET /``) and its static assets (``GET /assets/{path}``).

The page is plain files inside the package (``tradecanvas/serve/static/``: ``index.html``,
``chart.js``, ``chart.css`` and the vendored TradingView lightweight-charts under
``vendor/``, refreshed by ``scripts/vendor_lightweight_charts.sh``); there is no build step.
It reads the HTTP API and ``/ws/market`` at the origin it was served from (docs/chart.md).

Why a fixed table instead of a static-files mount: the files are read once, when the app is
built, into a mapping from their path under ``static/`` to their bytes and content type. A
request names a key of that mapping or gets 404, so no request path — ``..``, an encoded
slash, a symlink, an absolute path — ever reaches the file system.

Each file's gzip form is made then too (for the kinds that shrink), and an ETag from a
digest of its bytes. A request whose ``Accept-Encoding`` allows gzip gets the gzip form; a
request whose ``If-None-Match`` names the file's ETag gets 304 without a body. The answers say
``Cache-Control: no-cache``, so a reload revalidates every file (a daemon upgrade is seen at
once) and downloads none that did not change (docs/chart.md has the figures).

Every answer carries a Content-Security-Policy that allows scripts, styles and connections
to this origin only: the page makes no external request, and nothing injected into it could
reach another host. The page has no write path (it never sends the ingest token; the POST
endpoint refuses it without one), and its WebSocket is subject to the ``Origin`` allow-list
like any other (``TRADE_CANVAS_WS_ALLOWED_ORIGINS``).
"""

from __future__ import annotations

import gzip
import hashlib
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
    # revalidated on every load (a 304 while the ETag matches), so a daemon upgrade is
    # seen at once
    "Cache-Control": "no-cache",
    # the gzip form and the plain one share a URL
    "Vary": "Accept-Encoding",
}
# the kinds worth compressing (text); an image is compressed already
COMPRESSED_KINDS: Final = ("text/", "application/json", "image/svg+xml")
# files are compressed once, when the app is built: the smallest form is worth the time
GZIP_LEVEL: Final = 9


@final
@attrs.frozen
class StaticFile:
    """One file of the page: its bytes and the Content-Type it is served with."""

    body: bytes
    content_type: str
    # the gzip form of ``body``, None when the kind does not compress or it would not shrink
    gzipped: bytes | None = attrs.field(init=False)
    # a strong validator of ``body`` (the gzip form's adds ``-gz``: another representation)
    etag: str = attrs.field(init=False)

    @gzipped.default
    def _gzip(self) -> bytes | None:
        if not self.content_type.startswith(COMPRESSED_KINDS):
            return None
        packed = gzip.compress(self.body, compresslevel=GZIP_LEVEL, mtime=0)
        return packed if len(packed) < len(self.body) else None

    @etag.default
    def _digest(self) -> str:
        return '"' + hashlib.sha256(self.body).hexdigest()[:32] + '"'

    def answer(self, accept_encoding: str, if_none_match: str) -> Response:
        """The answer to a GET of this file: 304 when ``if_none_match`` names either form's
        ETag, else the gzip form when ``accept_encoding`` allows it and there is one, else
        the bytes as they are; always with the security headers."""
        zipped = self.gzipped is not None and accepts_gzip(accept_encoding)
        etag = self.etag[:-1] + '-gz"' if zipped else self.etag
        headers = {**SECURITY_HEADERS, "ETag": etag}
        held = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        if "*" in held or not held.isdisjoint({self.etag, self.etag[:-1] + '-gz"'}):
            return Response(status_code=304, headers=headers)
        if zipped:
            assert self.gzipped is not None
            headers["Content-Encoding"] = "gzip"
            return Response(self.gzipped, media_type=self.content_type, headers=headers)
        return Response(self.body, media_type=self.content_type, headers=headers)


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` value allows gzip (``gzip``, ``x-gzip`` or ``*``, not
    with ``q=0``)."""
    qualities: dict[str, float] = {}
    for item in accept_encoding.lower().split(","):
        name, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        qualities[name] = quality
    for name in ("gzip", "x-gzip", "*"):
        if name in qualities:
            return qualities[name] > 0
    return False


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
    answered too, a conditional GET (``If-None-Match``) with 304. An unknown asset is 404
    ``not_found``, as for any unknown route."""
    table = dict(load_static_files() if files is None else files)
    if INDEX not in table:
        raise FileNotFoundError(f"the chart page is missing: no {INDEX} in {STATIC_DIR}")

    def answer(found: StaticFile, request: Request) -> Response:
        headers = request.headers
        return found.answer(headers.get("accept-encoding", ""), headers.get("if-none-match", ""))

    async def page(request: Request) -> Response:
        return answer(table[INDEX], request)

    async def asset(request: Request) -> Response:
        name = str(request.path_params["path"])
        found = table.get(name)
        if found is None:
            raise RequestRefused(
                404, "not_found", f"no such asset: {ASSETS_PREFIX}{name}"
            ) from None
        return answer(found, request)

    return [
        Route("/", page, methods=["GET"]),
        Route("/assets/{path:path}", asset, methods=["GET"]),
    ]
