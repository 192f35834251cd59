"""Each entry point's limits over real HTTP and websockets, against uvicorn on loopback
served with the service's own connection limits (``api.__main__.connection_limits``):
bodies (size and time) on every route, request heads (size and time), idle connections,
and the websocket's token freshness and message size."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import SecretStr
from starlette.applications import Starlette
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from api.__main__ import connection_limits
from api.asgi import create_app
from api.auth import Principal, issue_token
from api.context import Context
from api.server import BoundedH11Protocol
from billing.enums import Role
from billing.models import GatewayEvent
from runtime.queue import InProcessQueue
from runtime.settings import Settings
from tests.support.gateways import GatewayHarness, free_port, signed
from workers.jobs import all_functions

WAIT = 15.0
SHORT = 0.5  # the deadlines these tests configure (the defaults are seconds long)
WEBHOOK_SECRET = "whsec_entry_points"


class Served:
    def __init__(self, port: int, settings: Settings) -> None:
        self.port = port
        self.settings = settings

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def request(self, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
        """Send raw bytes; return the status and everything until the server closes."""
        reader, writer = await self.open()
        try:
            writer.write(head + body)
            await writer.drain()
            return await response(reader)
        finally:
            writer.close()

    def token(self, *roles: Role, ttl: int = 600, account: str = "acct-entry") -> str:
        return issue_token(
            self.settings, account_id=account, user_id="u-1", roles=roles, ttl_seconds=ttl
        )


async def response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    async with asyncio.timeout(WAIT):
        line = await reader.readline()
        rest = await reader.read(1_000_000)
    assert line.startswith(b"HTTP/1.1 "), line
    return int(line.split()[1]), rest


class FastHead(BoundedH11Protocol):
    header_timeout = SHORT


@asynccontextmanager
async def serving(app: Starlette, settings: Settings) -> AsyncIterator[Served]:
    port = free_port()
    options = {**connection_limits(settings), "http": FastHead}
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, lifespan="off", log_level="warning", **options
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(1000):
            if server.started:
                break
            await asyncio.sleep(0.01)
        yield Served(port, settings)
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def served(
    app: Starlette, settings: Settings, harness: GatewayHarness
) -> AsyncIterator[Served]:
    """The app with the Stripe webhook on and short deadlines, over uvicorn."""
    changed = settings.model_copy(
        update={
            "payment_gateway": "stripe",
            "stripe_api_key": SecretStr("sk_test_entry_points"),
            "stripe_webhook_secret": SecretStr(WEBHOOK_SECRET),
            "body_timeout_seconds": SHORT,
            "keep_alive_seconds": SHORT,
            "header_timeout_seconds": SHORT,
            "max_body_bytes": 100_000,
            "max_header_bytes": 16_384,
        }
    )
    application = create_app(
        changed, gateway=harness.gateway, queue=InProcessQueue(all_functions())
    )
    async with serving(application, changed) as s:
        yield s


ROUTES = [b"POST /webhooks/stripe", b"POST /graphql"]


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.decode())
async def test_a_chunked_body_is_refused_once_past_the_limit(served: Served, route: bytes) -> None:
    """The body is never read past the limit: the server answers 413 while the client has
    not even finished sending (the webhook read any chunked body in full first)."""
    reader, writer = await served.open()
    try:
        writer.write(
            route + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\n\r\n"
        )
        chunk = b"x" * 10_000
        for _ in range(11):  # 110,000 bytes, over the 100,000 limit; no final chunk sent
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await writer.drain()
        status, _ = await response(reader)
    finally:
        writer.close()
    assert status == 413


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.decode())
async def test_a_body_that_does_not_arrive_in_time_is_408(served: Served, route: bytes) -> None:
    reader, writer = await served.open()
    try:
        writer.write(route + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
        status, _ = await response(reader)  # and nothing more is sent
    finally:
        writer.close()
    assert status == 408


async def test_headers_over_the_limit_are_refused(served: Served) -> None:
    """A 1 MiB Authorization header is refused without being kept (httptools took 40 MiB)."""
    head = (
        b"POST /graphql HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Authorization: Bearer " + b"a" * 1_048_576 + b"\r\n\r\n"
    )
    status, _ = await served.request(head, b"{}")
    assert status in (400, 431)
    # A normal request still fits.
    ok = await served.request(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ok[0] == 200


async def test_a_client_that_sends_no_complete_head_is_dropped(served: Served) -> None:
    reader, writer = await served.open()
    try:
        writer.write(b"POST /graphql HTTP/1.1\r\nHost: x\r\n")  # ... and never the rest
        await writer.drain()
        async with asyncio.timeout(WAIT):
            assert await reader.read() == b""  # closed by the server
    finally:
        writer.close()


async def test_an_idle_keep_alive_connection_is_dropped(served: Served) -> None:
    reader, writer = await served.open()
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(WAIT):
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            while await reader.read(65_536):
                pass  # the response, then the server closes the idle connection
    finally:
        writer.close()


# ---------------------------------------------------------------- the websocket


async def socket(served: Served, token: str) -> ClientConnection:
    ws = await connect(
        f"ws://127.0.0.1:{served.port}/graphql",
        subprotocols=[Subprotocol("graphql-transport-ws")],
        max_size=None,
    )
    await ws.send(
        json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}})
    )
    async with asyncio.timeout(WAIT):
        assert json.loads(await ws.recv())["type"] == "connection_ack"
    return ws


async def closed_with(ws: ClientConnection) -> int | None:
    try:
        async with asyncio.timeout(WAIT):
            while True:
                await ws.recv()
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else None


async def test_a_socket_that_never_authenticates_is_closed(served: Served) -> None:
    ws = await connect(
        f"ws://127.0.0.1:{served.port}/graphql",
        subprotocols=[Subprotocol("graphql-transport-ws")],
    )
    try:
        assert await closed_with(ws) == 4408  # no connection_init within the deadline
    finally:
        await ws.close()


async def test_the_socket_closes_when_its_token_expires(served: Served) -> None:
    """A 2-second token kept a socket open, and its operations running, for as long as the
    client liked (a purchase succeeded 45 s after expiry)."""
    ws = await socket(served, served.token(Role.ADMIN, ttl=2))
    try:
        await ws.send(
            json.dumps(
                {"id": "1", "type": "subscribe", "payload": {"query": "{ viewer { userId } }"}}
            )
        )
        async with asyncio.timeout(WAIT):
            first = json.loads(await ws.recv())
        assert first["payload"] == {"data": {"viewer": {"userId": "u-1"}}}
        assert await closed_with(ws) == 4401
    finally:
        await ws.close()


async def test_an_operation_with_an_expired_token_runs_nothing(
    app: Starlette, settings: Settings
) -> None:
    """Each operation on a socket is checked against the token's expiry, whether or not
    the socket is still open."""
    services = app.state.services
    schema = app.routes[0].endpoint.graphql.schema  # type: ignore[attr-defined]
    context = Context(
        principal=Principal(user_id="u", account_id="acct-expired", roles=frozenset({Role.ADMIN})),
        settings=settings,
        gateway=services.gateway,
        book=services.book,
        queue=services.queue,
        live=services.live,
        token_expires_at=1.0,  # long gone
    )
    mutation = (
        "mutation { updateLowBalanceAlert(input: {enabled: true, levelCredits: 5}) "
        "{ errors { code } } }"
    )
    results = await schema.stream(mutation, context_value=context)
    first = await anext(results)
    await results.aclose()
    assert first.errors[0].extensions["code"] == "UNAUTHENTICATED"
    assert first.data is None


async def test_a_socket_message_is_no_larger_than_a_body(served: Served) -> None:
    """An 8 MB message was accepted over the socket, beyond HTTP's body limit."""
    ws = await socket(served, served.token(Role.ADMIN))
    try:
        big = {
            "id": "1",
            "type": "subscribe",
            "payload": {"query": "{ viewer { userId } }", "variables": {"x": "y" * 200_000}},
        }
        await ws.send(json.dumps(big))
        assert await closed_with(ws) == 1009
    finally:
        await ws.close()


# ---------------------------------------------------------------- malformed signed webhooks


@pytest.fixture
async def webhook_client(
    app: Starlette, settings: Settings, harness: GatewayHarness
) -> AsyncIterator[httpx.AsyncClient]:
    changed = settings.model_copy(
        update={
            "payment_gateway": "stripe",
            "stripe_api_key": SecretStr("sk_test_entry_points"),
            "stripe_webhook_secret": SecretStr(WEBHOOK_SECRET),
        }
    )
    application = create_app(
        changed, gateway=harness.gateway, queue=InProcessQueue(all_functions())
    )
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


async def post_signed(client: httpx.AsyncClient, event: dict[str, Any]) -> httpx.Response:
    body, signature = signed(event, WEBHOOK_SECRET)
    return await client.post(
        "/webhooks/stripe",
        content=body,
        headers={"Content-Type": "application/json", "Stripe-Signature": signature},
    )


@pytest.mark.parametrize(
    "data", [None, {"object": None}, {"object": "pi_123"}, {"object": [1]}, "x"], ids=repr
)
async def test_a_signed_event_without_an_object_is_400_and_kept_as_rejected(
    webhook_client: httpx.AsyncClient, data: Any
) -> None:
    """It was stored and queued, and its job failed on every retry."""
    event_id = f"evt_{uuid.uuid4().hex[:16]}"
    event = {"id": event_id, "type": "payment_intent.succeeded", "data": data}
    response = await post_signed(webhook_client, event)
    assert response.status_code == 400
    (row,) = await GatewayEvent.filter(external_id=event_id)
    assert row.processed_at is not None  # never processed, never retried
    assert row.last_error is not None and row.last_error.startswith("rejected")


async def test_an_event_id_too_long_to_store_is_400(webhook_client: httpx.AsyncClient) -> None:
    """A 5,000-character id reached the database and came back as a 500."""
    event = {"id": "evt_" + "x" * 5_000, "type": "charge.refunded", "data": {"object": {}}}
    response = await post_signed(webhook_client, event)
    assert response.status_code == 400
