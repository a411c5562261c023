"""GET / and /assets/{path} through the real HTTP app on Hypercorn (127.0.0.1 port 0): the
page and its files with their content types and security headers, gzip-compressed when asked
and answered 304 while the client's copy is current, nothing outside the static table, and
the vendored lightweight-charts matching its recorded version."""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

import httpx
import pytest

from tests.conftest import flat_minutes
from tests.serve.test_http_api import running_api
from tests.serve.test_http_validation import BTC, T0
from tradecanvas.model import SeriesId
from tradecanvas.pipeline.commit import IngestBatch
from tradecanvas.serve.chart_page import (
    CONTENT_SECURITY_POLICY,
    STATIC_DIR,
    StaticFile,
    accepts_gzip,
    chart_page_routes,
    content_type_of,
    load_static_files,
    versioned_page,
)

VENDOR = STATIC_DIR / "vendor"
LWC = "lightweight-charts.standalone.production.js"


async def test_the_page_and_its_assets_are_served_with_their_types(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        page = await api.client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert page.headers["x-content-type-options"] == "nosniff"
        # every file the page loads is served, with its type
        loaded = re.findall(r'(?:src|href)="(/assets/[^"?]+)(?:\?v=[0-9a-f]+)?"', page.text)
        assert "/assets/chart.js" in loaded and f"/assets/vendor/{LWC}" in loaded
        for path in loaded:
            r = await api.client.get(path)
            assert r.status_code == 200, path
            assert r.headers["content-type"] == content_type_of(path), path
            assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        lwc = await api.client.get(f"/assets/vendor/{LWC}")
        assert lwc.content == (VENDOR / LWC).read_bytes()
        assert lwc.headers["content-type"] == "text/javascript; charset=utf-8"
        head = await api.client.head("/")
        assert head.status_code == 200 and head.content == b""


async def _raw(
    client: httpx.AsyncClient, path: str, **headers: str
) -> tuple[httpx.Response, bytes]:
    """An answer and its body as it came over the socket (httpx would decode the gzip)."""
    async with client.stream("GET", path, headers=headers) as r:
        return r, b"".join([chunk async for chunk in r.aiter_raw()])


@pytest.mark.parametrize(
    "path", ["/", "/assets/chart.js", "/assets/chart.css", f"/assets/vendor/{LWC}"]
)
async def test_the_files_go_gzipped_when_asked_and_304_while_current(
    tmp_path: Path, path: str
) -> None:
    name = "index.html" if path == "/" else path.removeprefix("/assets/")
    plain_bytes = chart_files()[name].body
    async with running_api(tmp_path) as api:
        zipped, body = await _raw(api.client, path, **{"Accept-Encoding": "gzip, deflate, br"})
        assert zipped.status_code == 200
        assert zipped.headers["content-encoding"] == "gzip"
        assert gzip.decompress(body) == plain_bytes
        assert len(body) < len(plain_bytes) * 0.6
        assert zipped.headers["vary"] == "Accept-Encoding"
        plain, body = await _raw(api.client, path, **{"Accept-Encoding": "identity"})
        assert "content-encoding" not in plain.headers and body == plain_bytes
        assert plain.headers["vary"] == "Accept-Encoding"
        # two representations, two validators, both from the bytes
        assert zipped.headers["etag"] != plain.headers["etag"]
        for answer in (zipped, plain):
            assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            assert answer.headers["x-content-type-options"] == "nosniff"
            assert answer.headers["cache-control"] == "no-cache"
            assert answer.headers["content-type"] == content_type_of(name)
            # a reload: the copy held is current, nothing is sent again
            again, body = await _raw(
                api.client,
                path,
                **{"Accept-Encoding": "gzip", "If-None-Match": answer.headers["etag"]},
            )
            assert again.status_code == 304 and body == b""
            assert again.headers["etag"] == zipped.headers["etag"]
            assert again.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        changed, body = await _raw(
            api.client, path, **{"Accept-Encoding": "gzip", "If-None-Match": '"an-older-copy"'}
        )
        assert changed.status_code == 200 and gzip.decompress(body) == plain_bytes


async def test_json_answers_go_gzipped_when_asked(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        await api.pipeline.run(IngestBatch.of(SeriesId.parse(BTC), flat_minutes(T0, 300), "rest"))
        path = f"/api/market/candles?series_id={BTC}&limit=300"
        zipped, body = await _raw(api.client, path, **{"Accept-Encoding": "gzip"})
        assert zipped.headers["content-encoding"] == "gzip"
        assert zipped.headers["content-type"] == "application/json"
        plain, plain_body = await _raw(api.client, path, **{"Accept-Encoding": "identity"})
        assert "content-encoding" not in plain.headers
        assert gzip.decompress(body) == plain_body and len(body) < len(plain_body) / 5
        assert zipped.headers["vary"] == plain.headers["vary"] == "Accept-Encoding"
        # a small answer is not worth it
        small, _ = await _raw(api.client, "/healthz", **{"Accept-Encoding": "gzip"})
        assert "content-encoding" not in small.headers


@pytest.mark.parametrize(
    ("header", "allowed"),
    [
        ("gzip, deflate, br", True),
        ("br;q=1.0, gzip;q=0.8", True),
        ("*", True),
        ("x-gzip", True),
        ("", False),
        ("identity", False),
        ("br", False),
        ("gzip;q=0", False),
        ("gzip; q=0.000, br", False),
        ("*;q=0", False),
        ("gzip;q=nonsense", False),
    ],
)
def test_accept_encoding_is_read_with_its_qualities(header: str, allowed: bool) -> None:
    assert accepts_gzip(header) is allowed


@pytest.mark.parametrize(
    "path",
    [
        "/assets/",
        "/assets/nope.js",
        "/assets/../http_api.py",
        "/assets/%2e%2e/chart_page.py",
        "/assets/..%2fchart_page.py",
        "/assets/vendor/../../chart_page.py",
        "/assets//etc/passwd",
        "/assets/%2fetc%2fpasswd",
        "/assets/chart.js/",
    ],
)
async def test_nothing_outside_the_static_files_is_served(tmp_path: Path, path: str) -> None:
    async with running_api(tmp_path) as api:
        r = await api.client.get(path)
        assert r.status_code == 404, r.text
        assert r.json()["error"] == "not_found"


async def test_the_page_has_no_write_path(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        assert (await api.client.post("/")).status_code == 405
        assert (await api.client.put("/assets/chart.js")).status_code == 405
    script = "".join(p.read_text() for p in sorted(STATIC_DIR.glob("*.js")))
    assert "keyboard.js" in {p.name for p in STATIC_DIR.glob("*.js")}
    assert "POST" not in script and "Authorization" not in script
    # the write endpoints (the page reads /readyz's "ingest" report, nothing else of ingest)
    assert "/api/market/ingest" not in script


def test_the_page_refers_to_its_own_origin_only() -> None:
    # every file of the page's own (the vendored library is checked by its licence test)
    names = sorted(p.name for p in STATIC_DIR.iterdir() if p.suffix in {".html", ".js", ".css"})
    assert {"index.html", "chart.js", "connection.js", "keyboard.js", "chart.css"} <= set(names)
    for name in names:
        text = (STATIC_DIR / name).read_text()
        # the only absolute URL is the attribution link (a link, never loaded)
        urls = set(re.findall(r"\b(?:https?|wss?)://[^\s\"'`)]+", text))
        assert urls <= {"https://www.tradingview.com/"}, (name, urls)


def test_hidden_and_unknown_kinds_of_files_are_left_out(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / ".secret.js").write_text("x")
    (tmp_path / "tool.py").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.css").write_text("a{}")
    files = load_static_files(tmp_path)
    assert sorted(files) == ["index.html", "sub/a.css"]
    assert files["sub/a.css"] == StaticFile(b"a{}", "text/css; charset=utf-8")
    with pytest.raises(FileNotFoundError):
        chart_page_routes({"chart.js": files["sub/a.css"]})


def test_the_vendored_chart_library_matches_its_recorded_version() -> None:
    version, source, checksum = (VENDOR / "VERSION").read_text().splitlines()
    assert version == "lightweight-charts 5.2.1"
    assert source.endswith("/lightweight-charts-5.2.1.tgz")
    digest, name = checksum.removeprefix("sha256 ").split()
    assert name == LWC
    body = (VENDOR / LWC).read_bytes()
    assert hashlib.sha256(body).hexdigest() == digest
    assert b"TradingView Lightweight Charts\xe2\x84\xa2 v5.2.1" in body[:300]
    assert "Apache License" in (VENDOR / "lightweight-charts.LICENSE").read_text()


def chart_files() -> dict[str, StaticFile]:
    """The files as the routes serve them: the page with its versioned references."""
    files = load_static_files()
    files["index.html"] = versioned_page(files["index.html"], files)
    return files


async def test_the_page_names_its_files_by_version_and_those_are_cached_for_good(
    tmp_path: Path,
) -> None:
    """A reload revalidated every file (a 304 each: 13 round trips before the chart could
    draw). The page names each file with its version; asked for with it, a file is cached
    for a year without revalidation (its bytes never change at that URL); asked for without
    it or with another (a page of an older release), it is revalidated as before."""
    files = load_static_files()
    async with running_api(tmp_path) as api:
        page = await api.client.get("/")
        assert page.headers["cache-control"] == "no-cache"  # an upgrade is seen at once
        named = dict(re.findall(r'(?:src|href)="/assets/([^"?]+)\?v=([0-9a-f]+)"', page.text))
        scripts = re.findall(r'<script src="/assets/([^"?]+)', page.text)
        assert scripts and set(scripts) <= set(named) and "chart.css" in named
        for name, version in named.items():
            assert version == hashlib.sha256(files[name].body).hexdigest()[:16], name
            current = await api.client.get(f"/assets/{name}", params={"v": version})
            assert current.status_code == 200, name
            assert current.headers["cache-control"] == "public, max-age=31536000, immutable"
            for other in ({}, {"v": "0" * 16}):
                plain = await api.client.get(f"/assets/{name}", params=other)
                assert plain.headers["cache-control"] == "no-cache"
                assert plain.content == current.content == files[name].body
        # the licence link is versioned too; a reference to no file is left alone
        assert "vendor/lightweight-charts.LICENSE" in named
        odd = StaticFile(b'<a href="/assets/gone.js">x</a>', "text/html; charset=utf-8")
        assert versioned_page(odd, files).body == odd.body
