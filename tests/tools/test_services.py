"""The test services' helper names a server that does not answer without the URL's password
(``scripts/e2e_services.py`` and the scale-out benchmark print its message)."""

from __future__ import annotations

from tradecanvas.tools.services import postgres_missing, redis_missing

SECRET = "svc-secret-0123"


def test_a_missing_service_is_named_without_its_password() -> None:
    # port 1: nothing listens there, the connection is refused at once
    pg = postgres_missing(f"postgresql://tc:{SECRET}@127.0.0.1:1/db?sslpassword={SECRET}")
    assert pg is not None and pg.startswith(
        "PostgreSQL at postgresql://tc:<redacted>@127.0.0.1:1/db?sslpassword=<redacted> does"
        " not answer"
    )
    redis = redis_missing(f"redis://default:{SECRET}@127.0.0.1:1/0")
    assert redis is not None
    assert redis.startswith("Redis at redis://default:<redacted>@127.0.0.1:1/0 does not answer")
    assert SECRET not in pg + redis
