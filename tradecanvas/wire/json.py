"""Our JSON in and out (orjson): /ws/market messages, HTTP bodies."""

from __future__ import annotations

from typing import Any

import orjson


def dumps(obj: object) -> str:
    """Our JSON out (orjson), as text for WebSocket text frames."""
    return orjson.dumps(obj).decode()


def loads(raw: bytes | str) -> Any:
    """Our JSON in; raises ``orjson.JSONDecodeError`` (a ValueError)."""
    return orjson.loads(raw)
