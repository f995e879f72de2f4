"""uvicorn's h11 protocol with the limits a public server needs and uvicorn leaves open.

uvicorn closes an idle keep-alive connection (``timeout_keep_alive``) but arms that timer only after a
response: a client that opens a connection and sends half of its headers, or sends them a byte at a time,
is held for ever (measured: ~1020 such connections exhausted the file descriptors and /health timed out).
Here every connection must deliver a request's headers within ``header_seconds`` of opening (or of the end
of the previous response), or it is closed; beyond ``max_connections`` open ones a new connection gets a
JSON 503 and is closed. h11's malformed-request answer is JSON too, as every error of this server is.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.h11_impl import H11Protocol


def _raw_response(status: int, reason: str, sentence: str, extra: str = "") -> bytes:
    body = json.dumps({"detail": sentence}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"{extra}connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def guarded_protocol(header_seconds: float, max_connections: int) -> type:
    busy = _raw_response(
        503, "Service Unavailable", "this server has too many open connections; try again shortly", "retry-after: 5\r\n"
    )

    class GuardedH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(busy)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_seconds, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            # Only while waiting for a request's headers: a request being answered (an event stream) stays.
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers are timed too, not only the idle wait before them

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            if self.cycle is not None and not self.cycle.response_complete:  # a response under way: uvicorn's
                return super().send_400_response(msg)
            self.transport.write(_raw_response(400, "Bad Request", "the request is not valid HTTP/1.1"))
            self.transport.close()

    return GuardedH11Protocol
