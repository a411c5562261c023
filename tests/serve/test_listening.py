"""Where the WS port's answer to a plain HTTP request sends the browser
(``serve.listening.http_url_of``)."""

from __future__ import annotations

from tradecanvas.serve.listening import http_url_of


def test_the_http_port_is_named_where_a_client_here_reaches_it() -> None:
    assert http_url_of("127.0.0.1", 8766) == "http://127.0.0.1:8766/"
    assert http_url_of("::1", 8766) == "http://[::1]:8766/"
    # a wildcard host or any port: which address the client uses is not known
    assert http_url_of("0.0.0.0", 8766) is None
    assert http_url_of("::", 8766) is None
    assert http_url_of("127.0.0.1", 0) is None
