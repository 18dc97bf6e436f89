"""Connection-level limits: uvicorn's httptools protocol with header and body deadlines, a header size cap
and a cap on open connections (the ASGI app only sees a request once its headers are complete, so these
cannot live in api/limits.py).

- ``header_timeout_s``: a connection must deliver a request's complete headers within this long of its
  first byte (or of the connection opening, for the first request); otherwise it gets 408 and is closed.
  Idle keep-alive connections are closed by uvicorn's own ``timeout_keep_alive``.
- ``body_timeout_s``: the rest of the request (its body) must arrive within this long of the end of its
  headers; otherwise 408 (if nothing was answered yet) and the connection is closed. Here rather than
  around the app's ``receive()``: an ``asyncio.timeout`` per request cost ~6 us of the event loop (timeit,
  dev box), a timer handle in the protocol ~1 us.
- ``MAX_HEADER_BYTES``: request headers larger than this get 431 and the connection is closed.
- ``max_connections``: a connection beyond this many open ones gets 503 with ``Retry-After`` and is closed.

Use: ``uvicorn.run(app, http=http_protocol(api_settings))`` (orchestrator/cli/serve.py and
tests/api/conftest.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.errors import error_body
from api.settings import ApiSettings

__all__ = ["http_protocol", "MAX_HEADER_BYTES"]

# 64 KiB: nginx's default large_client_header_buffers is 4 x 8 KiB; OpenAI clients send < 2 KiB of headers.
MAX_HEADER_BYTES = 64 * 1024


def _raw_response(status: int, reason: str, message: str, extra: str = "") -> bytes:
    body = orjson.dumps(error_body(message))
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"{extra}connection: close\r\n\r\n"
    )
    return head.encode() + body


def http_protocol(settings: ApiSettings) -> type[asyncio.Protocol]:
    """An HttpToolsProtocol subclass bound to `settings`' connection limits."""
    header_timeout_s = settings.header_timeout_s
    body_timeout_s = settings.body_timeout_s
    max_connections = settings.max_connections
    full = _raw_response(
        503,
        "Service Unavailable",
        f"the server is at its limit of {max_connections} open connections (max_connections). "
        "To fix: retry after Retry-After seconds.",
        f"retry-after: {settings.retry_after_s}\r\n",
    )
    slow = _raw_response(
        408,
        "Request Timeout",
        f"request headers did not arrive within {header_timeout_s:g} s (header_timeout_s)",
    )
    slow_body = _raw_response(
        408,
        "Request Timeout",
        f"the request body did not arrive within {body_timeout_s:g} s of its headers (body_timeout_s). "
        "To fix: send the whole body promptly.",
    )
    big = _raw_response(
        431,
        "Request Header Fields Too Large",
        f"request headers are larger than {MAX_HEADER_BYTES} bytes",
    )

    class ConServeHttpProtocol(HttpToolsProtocol):
        _hdr_timer: asyncio.TimerHandle | None = None
        _hdr_bytes = 0
        _in_headers = True

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(full)
                transport.close()
                return
            self._hdr_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def data_received(self, data: bytes) -> None:
            if self._in_headers:
                self._hdr_bytes += len(data)
            super().data_received(data)
            # still in the headers after parsing this read (a read that ends them never counts as too big)
            if self._in_headers and self._hdr_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
                self._cancel_timer()
                self.transport.write(big)
                self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_headers = True
            if self._hdr_timer is None:  # a later request on a kept-alive connection
                self._hdr_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._hdr_bytes = 0
            self._cancel_timer()
            super().on_headers_complete()
            # the body's deadline, from the end of the headers to the end of the message
            self._hdr_timer = self.loop.call_later(body_timeout_s, self._body_too_slow)

        def on_message_complete(self) -> None:
            self._cancel_timer()
            super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_timer()
            super().connection_lost(exc)

        def _cancel_timer(self) -> None:
            if self._hdr_timer is not None:
                self._hdr_timer.cancel()
                self._hdr_timer = None

        def _body_too_slow(self) -> None:
            self._hdr_timer = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is not None and cycle.response_started and not cycle.response_complete:
                return  # answering already (the app read what it needed); uvicorn ends it
            if cycle is None or not cycle.response_started:
                self.transport.write(slow_body)
            self.transport.close()

        def _headers_too_slow(self) -> None:
            self._hdr_timer = None
            if self._in_headers and not self.transport.is_closing():
                self.transport.write(slow)
                self.transport.close()

    return ConServeHttpProtocol
