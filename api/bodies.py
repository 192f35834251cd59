"""One bounded body reader for every HTTP route (``POST /graphql``, ``POST /webhooks/stripe``,
and whatever comes next): ``BoundedBody`` reads the request's body before the route runs,
up to ``MAX_BODY_BYTES`` and within ``BODY_TIMEOUT_SECONDS``, and hands the route the bytes
it read. A larger body is a 413 as soon as it passes the limit (chunked or not: the rest is
never read); a body that does not arrive in time is a 408. No route reads the socket
itself, so none can read an unbounded body.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class TooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole body; ``TooLarge`` as soon as it passes ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands out the body already read, then waits as usual (for the
    client's disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(
        {"errors": [{"message": message, "extensions": {"code": code}}]},
        status_code=status,
        headers={"Connection": "close"},
    )


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0  # the server refuses it; read with the limit anyway
    return 0


class BoundedBody:
    def __init__(self, app: ASGIApp, *, max_bytes: int, timeout_seconds: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_seconds = timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = _error(
            413, "PAYLOAD_TOO_LARGE", f"The request body is larger than {self.max_bytes:,} bytes."
        )
        if _declared_length(scope) > self.max_bytes:
            await too_large(scope, receive, send)
            return
        try:
            async with asyncio.timeout(self.timeout_seconds):
                body = await read_body(receive, self.max_bytes)
        except TooLarge:
            log.info("refused a request body over %d bytes", self.max_bytes)
            await too_large(scope, receive, send)
            return
        except TimeoutError:
            log.info("refused a request body not received within %g s", self.timeout_seconds)
            await _error(
                408,
                "REQUEST_TIMEOUT",
                f"The request body did not arrive within {self.timeout_seconds:g} s.",
            )(scope, receive, send)
            return
        except ClientGone:
            return
        await self.app(scope, replay(body, receive), send)
