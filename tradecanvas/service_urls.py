"""The service URLs of the flags (PostgreSQL, Redis), checked without I/O: each parser returns
the URL as given, stripped, or raises ValueError saying what is wrong and the allowed form."""

from __future__ import annotations

import urllib.parse
from typing import Final

# a store location starting with one of these is PostgreSQL (else a SQLite file)
POSTGRES_URL_SCHEMES: Final = ("postgresql://", "postgres://")
_DATABASE_URL_FORM: Final = "postgresql://[user[:password]@]host[:port]/dbname"
_REDIS_URL_FORM: Final = "redis[s]://[[user]:password@]host[:port][/db]"


def _url_parts(text: str, form: str) -> urllib.parse.SplitResult:
    """``text`` split, its port checked (a number in 1..65535 when given)."""
    parts = urllib.parse.urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"a bad port in {parts.netloc!r}; allowed: {form}") from None
    if port == 0:
        raise ValueError(f"port 0 in {parts.netloc!r}; allowed: {form}")
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
        raise ValueError(f"database {db!r} is not a number; allowed: {_REDIS_URL_FORM}")
    return text


__all__ = ["POSTGRES_URL_SCHEMES", "parse_database_url", "parse_redis_url"]
