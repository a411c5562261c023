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
request whose ``If-None-Match`` names the file's ETag gets 304 without a body.

Caching: the page (``index.html``) says ``Cache-Control: no-cache`` — a reload revalidates it
(a daemon upgrade is seen at once) — and names each of its files with its version, a part of
its digest (``/assets/chart.js?v=…``, written into the page when the table is built). An
asset asked for with its current version is sent ``immutable``, for a year: a reload asks
for none of them again. Without it, or with another (a page of an older release still
open), it is sent ``no-cache`` as the page is (docs/chart.md has the figures).

Every answer carries a Content-Security-Policy that allows scripts, styles and connections
to this origin only: the page makes no external request, and nothing injected into it could
reach another host. The page has no write path (it never sends the ingest token; the POST
endpoint refuses it without one), and its WebSocket is subject to the ``Origin`` allow-list
like any other (``TRADE_CANVAS_WS_ALLOWED_ORIGINS``).
"""

from __future__ import annotations

import gzip
import hashlib
import re
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
    # seen at once; an asset asked for by its version: IMMUTABLE
    "Cache-Control": "no-cache",
    # the gzip form and the plain one share a URL
    "Vary": "Accept-Encoding",
}
# an asset asked for with its current version (``?v=``): its bytes never change at that URL
IMMUTABLE: Final = "public, max-age=31536000, immutable"
# the page's references to its files (``src`` and ``href``), versioned when the table is built
ASSET_REFERENCE: Final = re.compile(r'(?P<attr>(?:src|href)=")/assets/(?P<name>[^"?#]+)"')
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

    @property
    def version(self) -> str:
        """What names these bytes in a versioned URL (``?v=``): a part of the digest."""
        return self.etag[1:17]

    def answer(
        self, accept_encoding: str, if_none_match: str, *, immutable: bool = False
    ) -> Response:
        """The answer to a GET of this file: 304 when ``if_none_match`` names either form's
        ETag, else the gzip form when ``accept_encoding`` allows it and there is one, else
        the bytes as they are; always with the security headers (``immutable``: cached
        for a year, not revalidated)."""
        zipped = self.gzipped is not None and accepts_gzip(accept_encoding)
        etag = self.etag[:-1] + '-gz"' if zipped else self.etag
        headers = {**SECURITY_HEADERS, "ETag": etag}
        if immutable:
            headers["Cache-Control"] = IMMUTABLE
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


def versioned_page(page: StaticFile, files: Mapping[str, StaticFile]) -> StaticFile:
    """``page`` with each ``src``/``href`` of one of ``files`` naming its version
    (``/assets/chart.js?v=…``); a reference to a file not among them is left as it is."""

    def versioned(found: re.Match[str]) -> str:
        asset = files.get(found["name"])
        if asset is None:
            return found[0]
        return f'{found["attr"]}{ASSETS_PREFIX}{found["name"]}?v={asset.version}"'

    text = ASSET_REFERENCE.sub(versioned, page.body.decode("utf-8"))
    return StaticFile(text.encode("utf-8"), page.content_type)


def chart_page_routes(files: Mapping[str, StaticFile] | None = None) -> list[BaseRoute]:
    """``GET /`` (the page) and ``GET /assets/{path}`` (its files) for the HTTP app; HEAD is
    answered too, a conditional GET (``If-None-Match``) with 304. An unknown asset is 404
    ``not_found``, as for any unknown route."""
    table = dict(load_static_files() if files is None else files)
    if INDEX not in table:
        raise FileNotFoundError(f"the chart page is missing: no {INDEX} in {STATIC_DIR}")
    table[INDEX] = versioned_page(table[INDEX], table)

    def answer(found: StaticFile, request: Request, *, immutable: bool = False) -> Response:
        headers = request.headers
        return found.answer(
            headers.get("accept-encoding", ""),
            headers.get("if-none-match", ""),
            immutable=immutable,
        )

    async def page(request: Request) -> Response:
        return answer(table[INDEX], request)

    async def asset(request: Request) -> Response:
        name = str(request.path_params["path"])
        found = table.get(name)
        if found is None:
            raise RequestRefused(
                404, "not_found", f"no such asset: {ASSETS_PREFIX}{name}"
            ) from None
        return answer(found, request, immutable=request.query_params.get("v") == found.version)

    return [
        Route("/", page, methods=["GET"]),
        Route("/assets/{path:path}", asset, methods=["GET"]),
    ]
