"""How uvicorn reads requests: h11 (not httptools, which bounds no header), with a limit on
the size of a request's head and a deadline for it, so a client can neither fill memory
with headers nor hold a connection by sending them slowly (or not at all).

``timeout_keep_alive`` drops a connection idle between requests; ``BoundedH11Protocol``
adds the deadline uvicorn lacks: from the connection's first byte (or the end of the
previous response) to the end of the request's headers. A slow body is the app's to
bound (``api.app.read_body``: a size limit and a deadline).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from runtime.settings import get_settings

#: Seconds a client has to send a request's line and headers.
HEADER_TIMEOUT_SECONDS = 10.0


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's head. Named by its path in
    uvicorn's options (``api.server:BoundedH11Protocol``, so worker processes can import
    it); the deadline is ``HEADER_TIMEOUT_SECONDS`` from the settings."""

    header_timeout: float | None = None  # None: the settings'

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None
        if self.header_timeout is None:
            self.header_timeout = get_settings().header_timeout_seconds

    def _arm(self) -> None:
        self._disarm()
        seconds = self.header_timeout or HEADER_TIMEOUT_SECONDS
        self._head_deadline = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _too_slow(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            self.logger.info("dropped a connection that sent no complete request in time")
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head arrived (or the request failed)
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # the next request's head has the same deadline
