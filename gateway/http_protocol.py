"""The HTTP server's connection handling, hardened for a public endpoint.

uvicorn's httptools protocol with three guards and one change of shape:
- a request's headers must arrive within `header_timeout_s` (a client trickling them byte by byte is
  answered 408 and closed, instead of holding a connection and a descriptor forever; a connection on which
  no request begins is closed without an answer);
- its body must arrive within `body_timeout_s` of the headers (the same);
- at most `max_connections` connections are open at once; one more is answered 503 and closed at once;
- a request the HTTP parser rejects (e.g. `Content-Length: -1`) gets OpenAI's error JSON, not plain text.
The application itself never sees these requests, so they have no ledger row: nothing was asked of a model.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("frugal.http")


def error_bytes(status: int, reason: str, message: str, code: str, extra_headers: bytes = b"") -> bytes:
    """A complete HTTP/1.1 error response in OpenAI's shape that closes the connection."""
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                   else "server_error", "param": None, "code": code}})
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n").encode() + extra_headers + b"\r\n" + body


class GuardedProtocol(HttpToolsProtocol):
    """Set the limits with `guarded_protocol`; uvicorn builds one of these per connection."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 2048

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._deadline: asyncio.TimerHandle | None = None
        #: Whether a request has begun to arrive (an idle connection is closed without an answer, as a
        #: keep-alive timeout would).
        self._begun = False

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired, what)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, what: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._begun:
            log.warning("closing a connection from %s: its request %s did not arrive in time",
                        self.client[0] if self.client else "?", what)
        if self._begun and (self.cycle is None or not self.cycle.response_started):
            limit = self.header_timeout_s if what == "headers" else self.body_timeout_s
            self.transport.write(error_bytes(408, "Request Timeout", f"The request {what} did not arrive within "
                                             f"{limit:g} s.", "request_timeout"))
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("refusing a connection: %d are open (limit %d)", len(self.connections) - 1,
                        self.max_connections)
            transport.write(error_bytes(503, "Service Unavailable", "Too many open connections; retry shortly.",
                                        "too_many_connections", b"retry-after: 1\r\n"))
            transport.close()
            return
        self._arm(self.header_timeout_s, "headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun = True
        self._arm(self.header_timeout_s, "headers")

    def on_headers_complete(self) -> None:
        self._arm(self.body_timeout_s, "body")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        self._disarm()
        self.transport.write(error_bytes(400, "Bad Request", f"The HTTP request is malformed ({msg.rstrip('.')}): "
                                         "check the request line, the headers and Content-Length.",
                                         "invalid_http_request"))
        self.transport.close()


def guarded_protocol(*, header_timeout_s: float, body_timeout_s: float, max_connections: int) -> type[GuardedProtocol]:
    """The protocol class for uvicorn's `http=`, with these limits."""
    return type("GuardedHttpProtocol", (GuardedProtocol,), {"header_timeout_s": header_timeout_s,
                                                            "body_timeout_s": body_timeout_s,
                                                            "max_connections": max_connections})
