"""The service URLs of the flags (PostgreSQL, Redis), checked without I/O: each parser returns
the URL as given, stripped, or raises ValueError saying what is wrong and the allowed form.

A URL is shown (in a message, by ``tradecanvas flags``, in a log line) only as
:func:`url_without_password` gives it: the password of its user information and the value
of every query parameter whose name holds "password", "secret" or "token" (``password``,
``sslpassword``; ``passfile`` names a file and is shown) replaced with ``<redacted>``.
:func:`url_secrets` lists those values, for the log's redactor.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Final

# a store location starting with one of these is PostgreSQL (else a SQLite file)
POSTGRES_URL_SCHEMES: Final = ("postgresql://", "postgres://")
_DATABASE_URL_FORM: Final = "postgresql://[user[:password]@]host[:port]/dbname"
_REDIS_URL_FORM: Final = "redis[s]://[[user]:password@]host[:port][/db]"
REDACTED: Final = "<redacted>"
# a query parameter whose name (any case) holds one of these carries a secret
SECRET_PARAMETER_WORDS: Final = ("password", "secret", "token")
# a query parameter: its separator, its name, "=", its value
_PARAMETER_RE: Final = re.compile(r"[?&]([^=&#?]*)=([^&#]*)")


# in text (a log line), what may stand before a URL's password: a user of RFC 3986's
# characters (and no "/", "[", ":"), and after the "@" that ends it: a host, IPv4 or
# [IPv6] (libpq: a list of them), with a port or not
_USER_RE: Final = re.compile(r"(?:[A-Za-z0-9._~!$&()*+,;=-]|%[0-9A-Fa-f]{2})*")
_HOST_RE: Final = re.compile(
    r"(?:(?:[A-Za-z0-9-]|%[0-9A-Fa-f]{2})+(?:\.(?:[A-Za-z0-9-]|%[0-9A-Fa-f]{2})+)*\.?"
    r"|\[[0-9A-Fa-f:.]+\])?(?::[0-9]*)?"
)
_HOSTS_RE: Final = re.compile(rf"{_HOST_RE.pattern}(?:,{_HOST_RE.pattern})*")
# ... and after the hosts at the end of a URL in text, what closes a bracket around it or
# ends the sentence: "(redis://u:p/w@h:6379)." (a URL in text runs to a space or a quote)
_HOSTS_IN_TEXT_RE: Final = re.compile(rf"(?:{_HOSTS_RE.pattern})[)\]}}>.,;:!`]*")


def _part_end(url: str, start: int) -> int:
    """Where the URL part at ``start`` ends: its first ``/``, ``?`` or ``#``, else the end."""
    return min((i for i in (url.find(c, start) for c in "/?#") if i >= 0), default=len(url))


def _userinfo_end(url: str, start: int, colon: int, *, in_text: bool) -> int:
    """Where ``url``'s user information (from ``start``, its first ``:`` at ``colon``) ends:
    its ``@``, -1 when none.

    An ``@`` in the authority (before the first ``/``, ``?`` or ``#``) is the user
    information's, and so the LAST one there (a password holding ``@``, unencoded). Past
    it, an ``@`` may end a password holding ``/``, ``?`` or ``#`` as well as sit in a path
    or a query (a stream ``btcusdt@kline_1m``, ``?application_name=a@b``): that cannot be
    told apart, and hiding too much is better than showing a password's tail, so the last
    one counts — in text only when the user before the ``:`` is one and what follows the
    ``@`` (to the next ``/``, ``?``, ``#``) is a host with or without a port (at the URL's
    end, and then a closing bracket or a sentence's punctuation).
    """
    authority_end = _part_end(url, start)
    at = url.rfind("@", colon)
    while at > colon:
        if at < authority_end or not in_text:
            return at
        host_end = _part_end(url, at)
        hosts = _HOSTS_IN_TEXT_RE if host_end == len(url) else _HOSTS_RE
        if _USER_RE.fullmatch(url, start, colon) and hosts.fullmatch(url, at + 1, host_end):
            return at
        at = url.rfind("@", colon, at)
    return -1


def _secret_spans(url: str, *, in_text: bool = False) -> list[tuple[int, int]]:
    """Where ``url``'s secrets are: (start, end) of each, in order, overlaps merged. The
    password is what follows the first ``:`` of the user information
    (:func:`_userinfo_end`); ``in_text``: a URL found in free text (a log line), which
    may well hold an ``@`` and no user information."""
    spans: list[tuple[int, int]] = []
    start = url.find("://") + 3 if "://" in url else 0
    colon = url.find(":", start)
    if colon >= 0 and (at := _userinfo_end(url, start, colon, in_text=in_text)) >= 0:
        spans.append((colon + 1, at))
    for found in _PARAMETER_RE.finditer(url, start):
        name = urllib.parse.unquote_plus(found.group(1)).lower()
        if any(word in name for word in SECRET_PARAMETER_WORDS):
            spans.append(found.span(2))
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def url_without_password(url: str | None, *, in_text: bool = False) -> str:
    """``postgresql://user:secret@host/db?sslpassword=x`` as
    ``postgresql://user:<redacted>@host/db?sslpassword=<redacted>`` (``<unset>`` for None).
    ``in_text``: a URL found in free text (:func:`_userinfo_end`)."""
    if url is None:
        return "<unset>"
    shown = url
    for lo, hi in reversed(_secret_spans(url, in_text=in_text)):
        shown = shown[:lo] + REDACTED + shown[hi:]
    return shown


def url_secrets(url: str | None) -> tuple[str, ...]:
    """The secrets :func:`url_without_password` hides, as written and percent-decoded."""
    found: list[str] = []
    for lo, hi in _secret_spans(url or ""):
        raw = url[lo:hi] if url else ""
        for text in (raw, urllib.parse.unquote(raw), urllib.parse.unquote_plus(raw)):
            if text and text not in found:
                found.append(text)
    return tuple(found)


def _url_parts(text: str, form: str) -> urllib.parse.SplitResult:
    """``text`` split, its port checked (a number in 1..65535 when given). The messages quote
    the URL without its password (urllib's own would quote the password)."""
    shown = url_without_password(text)
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:  # a bracket left open, a character NFKC makes a separator
        raise ValueError(f"a bad host in {shown!r}; allowed: {form}") from None
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"a bad port in {shown!r}; allowed: {form}") from None
    if port == 0:
        raise ValueError(f"port 0 in {shown!r}; allowed: {form}")
    return parts


def parse_database_url(text: str) -> str:
    """A PostgreSQL URL that names its database (without one, libpq takes the user's
    name: the store's tables would land in ``postgres``, the server's own database)."""
    text = text.strip()
    if not text.lower().startswith(POSTGRES_URL_SCHEMES):
        raise ValueError(f"not a PostgreSQL URL; allowed: {_DATABASE_URL_FORM}")
    parts = _url_parts(text, _DATABASE_URL_FORM)
    named = parts.path.strip("/") or urllib.parse.parse_qs(parts.query).get("dbname")
    if not named:
        raise ValueError(f"no database name; allowed: {_DATABASE_URL_FORM}")
    return text


def parse_redis_url(text: str) -> str:
    text = text.strip()
    if not text.lower().startswith(("redis://", "rediss://")):
        raise ValueError(f"not a Redis URL; allowed: {_REDIS_URL_FORM}")
    parts = _url_parts(text, _REDIS_URL_FORM)
    db = parts.path.strip("/")
    if db and not db.isdigit():
        shown = url_without_password(text)
        raise ValueError(f"database in {shown!r} is not a number; allowed: {_REDIS_URL_FORM}")
    return text


__all__ = [
    "POSTGRES_URL_SCHEMES",
    "REDACTED",
    "SECRET_PARAMETER_WORDS",
    "parse_database_url",
    "parse_redis_url",
    "url_secrets",
    "url_without_password",
]
