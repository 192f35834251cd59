"""The live balance: ``creditBalanceChanged`` over graphql-transport-ws on a real uvicorn
server on loopback, fed in process (the embedded default) and through Redis pub/sub
(several API processes, arq workers)."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import uvicorn
from pydantic import SecretStr
from redis.asyncio import Redis
from starlette.applications import Starlette
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from api.asgi import create_app
from api.auth import issue_token
from billing.enums import Role
from runtime.live import BalanceEvent, RedisBroadcaster, channel_prefix
from runtime.queue import ArqQueue, InProcessQueue
from runtime.settings import Settings
from tests.conftest import Caller, MakeCaller
from tests.support.gateways import GatewayHarness, free_port
from tests.support.ops import AUTO_RECHARGE, add_card, buy, consume, grant, key
from workers.jobs import all_functions

SUBSCRIPTION = """subscription { creditBalanceChanged { balance
  transaction { id type processType credits balanceAfter reference user { userId } } } }"""
BATCH = """mutation($inputs: [ConsumeCreditsInput!]!) {
  consumeCreditsBatch(inputs: $inputs) { balance errors { code } } }"""
WAIT = 15.0


class Server:
    """An ASGI app served by uvicorn on a free loopback port, in the test's event loop."""

    def __init__(self, app: Starlette) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, lifespan="off", log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task[None] | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/graphql"

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve())
        for _ in range(1000):
            if self.server.started:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("uvicorn did not start within 10 s")

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task


@asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[Server]:
    server = Server(app)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture
async def server(app: Starlette) -> AsyncIterator[Server]:
    """The suite's app (its lifespan already ran), over real HTTP and websockets."""
    async with serving(app) as s:
        yield s


@pytest_asyncio.fixture
async def remote(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    """Another connection to the server, over real HTTP."""
    async with httpx.AsyncClient(base_url=server.http, timeout=WAIT) as client:
        yield client


def over(client: httpx.AsyncClient, who: Caller) -> Caller:
    return Caller(client, who.token, who.account_id, who.user_id, who.harness)


class Feed:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def message(self) -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            data: dict[str, Any] = json.loads(await self.ws.recv())
        return data

    async def next(self) -> dict[str, Any]:
        """The next event of subscription 1."""
        message = await self.message()
        assert message["type"] == "next" and message["id"] == "1", message
        assert "errors" not in message["payload"], message
        event: dict[str, Any] = message["payload"]["data"]["creditBalanceChanged"]
        return event

    async def until(self, tx_type: str) -> dict[str, Any]:
        while True:
            event = await self.next()
            if event["transaction"] and event["transaction"]["type"] == tx_type:
                return event


async def open_socket(url: str, payload: dict[str, Any] | None) -> ClientConnection:
    ws = await connect(url, subprotocols=[Subprotocol("graphql-transport-ws")])
    message: dict[str, Any] = {"type": "connection_init"}
    if payload is not None:
        message["payload"] = payload
    await ws.send(json.dumps(message))
    return ws


@asynccontextmanager
async def subscribed(url: str, token: str) -> AsyncIterator[Feed]:
    """Connected, acknowledged and subscribed; the first event (the balance now) is left
    for the test to read: once it has arrived, the subscription is listening."""
    ws = await open_socket(url, {"authorization": f"Bearer {token}"})
    try:
        feed = Feed(ws)
        assert (await feed.message())["type"] == "connection_ack"
        await ws.send(
            json.dumps({"id": "1", "type": "subscribe", "payload": {"query": SUBSCRIPTION}})
        )
        yield feed
        await ws.send(json.dumps({"id": "1", "type": "complete"}))
    finally:
        await ws.close()


async def closed_with(ws: ClientConnection) -> int | None:
    try:
        async with asyncio.timeout(WAIT):
            while True:
                await ws.recv()
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else None


# ---------------------------------------------------------------- in process


async def test_admin_sees_a_spend_made_through_another_connection(
    server: Server, remote: httpx.AsyncClient, admin: Caller, service: Caller, staff: Caller
) -> None:
    await grant(staff, admin.account_id, 1000)
    async with subscribed(server.ws, admin.token) as feed:
        assert await feed.next() == {"balance": 1000, "transaction": None}
        spent = await consume(over(remote, service), "POSTCARD", 2, reference="campaign-7")
        assert spent["errors"] == []
        event = await feed.next()
        assert event["balance"] == 976
        assert event["transaction"] == {
            "id": spent["transaction"]["id"],
            "type": "USAGE",
            "processType": "POSTCARD",
            "credits": -24,
            "balanceAfter": 976,
            "reference": "campaign-7",
            "user": {"userId": "user-1"},
        }


async def test_another_accounts_spends_are_not_seen(
    server: Server, remote: httpx.AsyncClient, admin: Caller, caller: MakeCaller, staff: Caller
) -> None:
    other = f"acct-{uuid.uuid4().hex[:12]}"
    await grant(staff, admin.account_id, 100)
    await grant(staff, other, 100)
    ours = caller(admin.account_id, Role.SERVICE, user="svc-ours")
    theirs = caller(other, Role.SERVICE, user="svc-theirs")
    async with subscribed(server.ws, admin.token) as feed:
        assert (await feed.next())["balance"] == 100
        assert (await consume(over(remote, theirs), "POSTCARD", 3))["errors"] == []
        mine = await consume(over(remote, ours), "PROSPECT_SEARCH", 1)
        event = await feed.next()  # theirs came first and was not delivered
        assert event["transaction"]["id"] == mine["transaction"]["id"]
        assert event["balance"] == 98


async def test_purchases_grants_and_auto_recharges_are_seen(
    server: Server,
    remote: httpx.AsyncClient,
    admin: Caller,
    service: Caller,
    staff: Caller,
    queue: InProcessQueue,
) -> None:
    await add_card(admin, "pm_card_visa")
    async with subscribed(server.ws, admin.token) as feed:
        assert (await feed.next())["balance"] == 0
        bought = await buy(over(remote, admin), 500)
        assert bought["payment"]["status"] == "SUCCEEDED"
        assert (await feed.next())["transaction"]["type"] == "PURCHASE"
        await grant(over(remote, staff), admin.account_id, 100)
        event = await feed.next()
        assert (event["balance"], event["transaction"]["type"]) == (600, "GRANT")
        data = await over(remote, admin).gql(
            AUTO_RECHARGE,
            {
                "input": {
                    "enabled": True,
                    "trigger": "THRESHOLD",
                    "thresholdCredits": 590,
                    "rechargeCredits": 200,
                }
            },
        )
        assert data["updateAutoRecharge"]["errors"] == []
        # A spend under the threshold; the recharge job (after the spend's commit) follows.
        assert (await consume(over(remote, service), "POSTCARD", 1))["errors"] == []
        assert (await feed.next())["transaction"]["type"] == "USAGE"
        recharged = await feed.until("AUTO_RECHARGE")
        assert recharged["transaction"]["credits"] == 200
        assert recharged["balance"] == 788
    await queue.drain()


async def test_a_refund_webhook_is_seen(
    server: Server,
    http: httpx.AsyncClient,
    admin: Caller,
    gateway_name: str,
    queue: InProcessQueue,
) -> None:
    """A Stripe refund: the webhook is stored, its job moves the balance and publishes."""
    if gateway_name != "stripe":
        pytest.skip("Stripe webhooks")
    from tests.api.test_stripe import _charge, event, payment_row, post_event

    await add_card(admin, "pm_card_visa")
    bought = await buy(admin, 1000)
    payment = await payment_row(bought["payment"]["id"])
    async with subscribed(server.ws, admin.token) as feed:
        assert (await feed.next())["balance"] == 1000
        refunded = event("charge.refunded", _charge(payment, payment.amount_cents // 4))
        assert (await post_event(http, refunded)).status_code == 200
        event_seen = await feed.until("REFUND")
        assert (event_seen["balance"], event_seen["transaction"]["credits"]) == (750, -250)
    await queue.drain()


async def test_each_spend_of_a_batch_is_seen(
    server: Server, remote: httpx.AsyncClient, admin: Caller, service: Caller, staff: Caller
) -> None:
    await grant(staff, admin.account_id, 100)
    item = {"accountId": admin.account_id, "userId": "u1", "processType": "PROSPECT_SEARCH"}
    async with subscribed(server.ws, admin.token) as feed:
        assert (await feed.next())["balance"] == 100
        data = await over(remote, service).gql(
            BATCH, {"inputs": [{**item, "quantity": q, "idempotencyKey": key()} for q in (1, 2, 3)]}
        )
        assert [r["balance"] for r in data["consumeCreditsBatch"]] == [98, 94, 88]
        events = [await feed.next() for _ in range(3)]
        assert [e["transaction"]["credits"] for e in events] == [-2, -4, -6]
        assert [e["transaction"]["balanceAfter"] for e in events] == [98, 94, 88]
        assert events[-1]["balance"] == 88


async def test_users_and_services_may_not_subscribe(server: Server, caller: MakeCaller) -> None:
    account = f"acct-{uuid.uuid4().hex[:12]}"
    for role in (Role.USER, Role.SERVICE, Role.BILLING_STAFF):
        who = caller(account, role)
        async with subscribed(server.ws, who.token) as feed:
            message = await feed.message()
            assert message["type"] == "error" and message["id"] == "1", message
            assert message["payload"][0]["extensions"]["code"] == "FORBIDDEN"


@pytest.mark.parametrize(
    "payload",
    [
        None,
        {},
        {"authorization": "Bearer not-a-token"},
        {"authorization": "Basic dXNlcjpwYXNz"},
        {"authorization": 42},
        "expired",
        "forged",
    ],
)
async def test_a_missing_or_bad_token_is_refused(
    server: Server, settings: Settings, account_id: str, payload: Any
) -> None:
    if payload in ("expired", "forged"):
        secret = settings if payload == "expired" else _other_secret(settings)
        token = issue_token(
            secret,
            account_id=account_id,
            user_id="admin-1",
            roles=[Role.ADMIN],
            ttl_seconds=-3600 if payload == "expired" else 3600,
        )
        payload = {"authorization": f"Bearer {token}"}
    ws = await open_socket(server.ws, payload)
    try:
        assert await closed_with(ws) == 4403
    finally:
        await ws.close()


async def test_subscribing_before_connection_init_is_refused(server: Server) -> None:
    ws = await connect(server.ws, subprotocols=[Subprotocol("graphql-transport-ws")])
    try:
        await ws.send(
            json.dumps({"id": "1", "type": "subscribe", "payload": {"query": SUBSCRIPTION}})
        )
        assert await closed_with(ws) == 4401
    finally:
        await ws.close()


async def test_the_feed_ends_when_the_token_expires(
    server: Server, settings: Settings, account_id: str
) -> None:
    token = issue_token(
        settings, account_id=account_id, user_id="admin-1", roles=[Role.ADMIN], ttl_seconds=2
    )
    async with subscribed(server.ws, token) as feed:
        assert (await feed.next())["transaction"] is None
        message = await feed.message()
        assert message["type"] == "next", message
        assert message["payload"]["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
        assert (await feed.message())["type"] == "complete"


def _other_secret(settings: Settings) -> Settings:
    return settings.model_copy(update={"credits_jwt_secret": SecretStr("x" * 40)})


# ---------------------------------------------------------------- Redis pub/sub

REDIS_URL = "redis://127.0.0.1:6379/0"


async def _redis_up(url: str) -> bool:
    client = Redis.from_url(url)
    try:
        async with asyncio.timeout(2):
            return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


@pytest_asyncio.fixture
async def shared_redis() -> AsyncIterator[str]:
    """The machine's Redis, with channels of this test's own (a unique prefix)."""
    if not await _redis_up(REDIS_URL):
        pytest.skip("no Redis on 127.0.0.1:6379")
    yield f"test:{uuid.uuid4().hex}:"


@asynccontextmanager
async def live_through(app: Starlette, broadcaster: RedisBroadcaster) -> AsyncIterator[None]:
    """The running app (and its in-process jobs) publishing and listening over Redis."""
    services = app.state.services
    previous = services.live
    services.live = broadcaster
    queue = services.queue
    had = queue.ctx.get("live") if isinstance(queue, InProcessQueue) else None
    if isinstance(queue, InProcessQueue):
        queue.ctx["live"] = broadcaster
    try:
        yield
    finally:
        if isinstance(queue, InProcessQueue):
            await queue.drain()
            queue.ctx["live"] = had
        services.live = previous
        await broadcaster.close()


async def test_redis_carries_changes_between_api_processes(
    app: Starlette,
    server: Server,
    settings: Settings,
    harness: GatewayHarness,
    shared_redis: str,
    admin: Caller,
    service: Caller,
    staff: Caller,
) -> None:
    """Two API servers on one database and one Redis: a spend through the second one (and
    the auto-recharge job it runs) reaches a subscriber of the first one."""
    await add_card(admin, "pm_card_visa")
    await grant(staff, admin.account_id, 1000)
    second_queue = InProcessQueue(all_functions())
    second = create_app(
        settings,
        gateway=harness.gateway,
        queue=second_queue,
        live=RedisBroadcaster.connect(REDIS_URL, prefix=shared_redis),
    )
    async with (
        live_through(app, RedisBroadcaster.connect(REDIS_URL, prefix=shared_redis)),
        serving(second) as other,
        httpx.AsyncClient(base_url=other.http, timeout=WAIT) as client,
    ):
        data = await over(client, admin).gql(
            AUTO_RECHARGE,
            {
                "input": {
                    "enabled": True,
                    "trigger": "THRESHOLD",
                    "thresholdCredits": 990,
                    "rechargeCredits": 300,
                }
            },
        )
        assert data["updateAutoRecharge"]["errors"] == []
        async with subscribed(server.ws, admin.token) as feed:
            assert (await feed.next())["balance"] == 1000
            spent = await consume(over(client, service), "POSTCARD", 1)
            event = await feed.next()
            assert event["transaction"]["id"] == spent["transaction"]["id"]
            assert event["balance"] in (988, 1288)  # the recharge may have landed already
            recharged = await feed.until("AUTO_RECHARGE")
            assert recharged["balance"] == 1288
        await second_queue.drain()
        await second.state.services.live.close()


async def test_redis_listeners_follow_only_their_account(shared_redis: str) -> None:
    from billing.enums import ProcessType, TransactionType
    from billing.models import LedgerEntry
    from billing.sql import now

    def entry(account: str, balance: int) -> LedgerEntry:
        return LedgerEntry(
            id=uuid.uuid4(),
            account_id=account,
            created_at=now(),
            type=TransactionType.USAGE,
            process_type=ProcessType.POSTCARD,
            credits=-12,
            balance_after=balance,
            quantity=1,
            user_id="u",
            description="Postcard x 1",
            reference=None,
            payment_id=None,
            reverses_entry_id=None,
        )

    listening = RedisBroadcaster.connect(REDIS_URL, prefix=shared_redis)
    publishing = RedisBroadcaster.connect(REDIS_URL, prefix=shared_redis)
    try:
        async with listening.listen("a") as a, listening.listen("a") as a2:
            async with listening.listen("b") as b:
                await publishing.publish([entry("b", 5), entry("a", 7)])
                async with asyncio.timeout(WAIT):
                    got = [await a.get(), await a2.get(), await b.get()]
                assert [(e.account_id, e.entry and e.entry.balance_after) for e in got] == [
                    ("a", 7),
                    ("a", 7),
                    ("b", 5),
                ]
            # b's listener left: its channel is unsubscribed, a's still heard.
            await publishing.publish([entry("b", 1), entry("a", 3)])
            async with asyncio.timeout(WAIT):
                assert (await a.get()).entry.balance_after == 3  # type: ignore[union-attr]
            assert a.pending() == 0
    finally:
        await listening.close()
        await publishing.close()


async def test_concurrent_publishes_share_round_trips_and_keep_their_order(
    shared_redis: str,
) -> None:
    """Spends committing together publish in a few pipelines, not one round trip each;
    every event arrives, each account's in the order its publishes were made."""
    from billing.enums import ProcessType, TransactionType
    from billing.models import LedgerEntry
    from billing.sql import now

    def entry(account: str, balance: int) -> LedgerEntry:
        return LedgerEntry(
            id=uuid.uuid4(),
            account_id=account,
            created_at=now(),
            type=TransactionType.USAGE,
            process_type=ProcessType.POSTCARD,
            credits=-1,
            balance_after=balance,
            description="Postcard x 1",
        )

    listening = RedisBroadcaster.connect(REDIS_URL, prefix=shared_redis)
    publishing = RedisBroadcaster.connect(REDIS_URL, prefix=shared_redis)
    pipelines = 0
    pipeline = publishing.redis.pipeline

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal pipelines
        pipelines += 1
        return pipeline(*args, **kwargs)

    publishing.redis.pipeline = counted  # type: ignore[method-assign]
    try:
        async with listening.listen("a") as a, listening.listen("b") as b:
            await asyncio.gather(
                *(publishing.publish([entry("a" if i % 2 else "b", 1000 - i)]) for i in range(60))
            )
            async with asyncio.timeout(WAIT):
                got_a = [(await a.get()).entry for _ in range(30)]
                got_b = [(await b.get()).entry for _ in range(30)]
        assert [e.balance_after for e in got_a if e] == [1000 - i for i in range(1, 60, 2)]
        assert [e.balance_after for e in got_b if e] == [1000 - i for i in range(0, 60, 2)]
        assert pipelines < 60
    finally:
        await listening.close()
        await publishing.close()


async def test_publishing_without_redis_does_not_fail_the_change() -> None:
    dead = RedisBroadcaster.connect(f"redis://127.0.0.1:{free_port()}/0")
    try:
        from billing.enums import ProcessType, TransactionType
        from billing.models import LedgerEntry
        from billing.sql import now

        await dead.publish(
            [
                LedgerEntry(
                    id=uuid.uuid4(),
                    account_id="a",
                    created_at=now(),
                    type=TransactionType.GRANT,
                    process_type=ProcessType.ADMINISTRATIVE,
                    credits=5,
                    balance_after=5,
                    description="x",
                )
            ]
        )
    finally:
        await dead.close()


async def test_a_subscription_without_redis_is_a_clear_error(
    app: Starlette, server: Server, admin: Caller
) -> None:
    dead = RedisBroadcaster.connect(f"redis://127.0.0.1:{free_port()}/0")
    async with live_through(app, dead), subscribed(server.ws, admin.token) as feed:
        message = await feed.message()
        assert message["type"] == "next", message
        assert message["payload"]["errors"][0]["extensions"]["code"] == "SERVICE_UNAVAILABLE"
        assert (await feed.message())["type"] == "complete"


def test_channels_name_the_redis_database() -> None:
    assert channel_prefix("redis://127.0.0.1:6379/0") != channel_prefix("redis://127.0.0.1:6379/1")
    assert channel_prefix("redis://127.0.0.1:6379") == channel_prefix("redis://127.0.0.1:6379/0")


# ------------------------------------------- a private Redis: restarts and the arq worker

needs_redis_server = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Any]:
    from tests.system.test_arq import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@needs_redis_server
async def test_listeners_are_told_to_resync_after_redis_restarts(private_redis: Any) -> None:
    live = RedisBroadcaster.connect(private_redis.url)
    try:
        async with live.listen("acct-r") as listener:
            private_redis.stop()
            await asyncio.sleep(0.5)
            private_redis.start()
            async with asyncio.timeout(WAIT):
                event = await listener.get()
            assert event == BalanceEvent("acct-r", None)
            # Subscribed again: events flow.
            from billing.enums import ProcessType, TransactionType
            from billing.models import LedgerEntry
            from billing.sql import now

            await live.publish(
                [
                    LedgerEntry(
                        id=uuid.uuid4(),
                        account_id="acct-r",
                        created_at=now(),
                        type=TransactionType.GRANT,
                        process_type=ProcessType.ADMINISTRATIVE,
                        credits=5,
                        balance_after=5,
                        description="x",
                    )
                ]
            )
            async with asyncio.timeout(WAIT):
                assert (await listener.get()).entry is not None
    finally:
        await live.close()


@needs_redis_server
async def test_an_arq_worker_publishes_the_recharge_it_commits(
    app: Starlette,
    server: Server,
    remote: httpx.AsyncClient,
    private_redis: Any,
    admin: Caller,
    service: Caller,
    staff: Caller,
) -> None:
    """JOB_QUEUE=arq: the spend's recharge runs in an arq worker, whose commit reaches the
    API process's subscriber through Redis."""
    from tests.system.test_arq import run_worker_burst

    await add_card(admin, "pm_card_visa")
    await grant(staff, admin.account_id, 1000)
    services = app.state.services
    inprocess = services.queue
    arq_queue = await ArqQueue.connect(private_redis.url)
    worker_live = RedisBroadcaster.connect(private_redis.url)
    services.queue = arq_queue
    try:
        async with live_through(app, RedisBroadcaster.connect(private_redis.url)):
            data = await over(remote, admin).gql(
                AUTO_RECHARGE,
                {
                    "input": {
                        "enabled": True,
                        "trigger": "THRESHOLD",
                        "thresholdCredits": 990,
                        "rechargeCredits": 400,
                    }
                },
            )
            assert data["updateAutoRecharge"]["errors"] == []
            async with subscribed(server.ws, admin.token) as feed:
                assert (await feed.next())["balance"] == 1000
                assert (await consume(over(remote, service), "POSTCARD", 1))["errors"] == []
                assert (await feed.next())["transaction"]["type"] == "USAGE"
                ctx = {**inprocess.ctx, "queue": arq_queue, "live": worker_live}
                await run_worker_burst(private_redis.url, ctx)
                recharged = await feed.until("AUTO_RECHARGE")
                assert (recharged["balance"], recharged["transaction"]["credits"]) == (1388, 400)
    finally:
        services.queue = inprocess
        await arq_queue.close()
        await worker_live.close()


async def test_the_worker_context_publishes_over_redis(settings: Settings) -> None:
    from workers.settings import bind_context

    client = Redis.from_url(settings.redis_url)
    ctx: dict[str, Any] = {"redis": client}
    try:
        await bind_context(ctx, settings)
        assert isinstance(ctx["live"], RedisBroadcaster)
        assert ctx["live"].prefix == channel_prefix(settings.redis_url)
    finally:
        await client.aclose()
