"""Live balance updates: after a change commits, its ledger entries are published on the
account's channel; the API's ``creditBalanceChanged`` subscription listens to it.

Both the API (after a resolver's commit) and the jobs (after a job's commit) publish,
through ``runtime.effects.after_commit``; ``billing`` only reports what changed
(``billing.changes``). Two broadcasters share one interface:

- ``InProcessBroadcaster``: the embedded default (``JOB_QUEUE=inprocess``), where the API
  and its jobs share one process.
- ``RedisBroadcaster``: Redis pub/sub, one channel per account, so every API process
  hears what any API process or arq worker committed. An API process holds one pub/sub
  connection and is subscribed to an account's channel while one of its clients listens.

Pub/sub keeps nothing, so delivery is best effort: what a listener misses (Redis
restarting, a client too slow to keep up) is made good by the next event, since the
subscription reads the balance again for the last event it has; after Redis comes back,
each listener gets a ``resync`` event (``entry`` None) for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import orjson
from redis.exceptions import RedisError

from billing.enums import ProcessType, TransactionType
from billing.models import LedgerEntry
from runtime.resilience import Outage

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

log = logging.getLogger(__name__)

QUEUE_SIZE = 256  # events a listener may lag behind before the oldest are dropped
SUBSCRIBE_TIMEOUT = 5.0
READ_TIMEOUT = 1.0
RECONNECT_DELAY = 1.0


class LiveUnavailable(Exception):
    """Listening is impossible right now (Redis can't be reached)."""


@dataclass(frozen=True, slots=True)
class BalanceEvent:
    account_id: str
    entry: LedgerEntry | None  # None: events may have been missed; read the balance again


class Listener:
    """One subscriber's events, in order; the oldest are dropped if it falls far behind."""

    def __init__(self, account_id: str) -> None:
        self.account_id = account_id
        self._queue: asyncio.Queue[BalanceEvent] = asyncio.Queue(QUEUE_SIZE)

    def put(self, event: BalanceEvent) -> None:
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(event)

    async def get(self) -> BalanceEvent:
        return await self._queue.get()

    def pending(self) -> int:
        """Events waiting (the last of a burst is the one to read the balance for)."""
        return self._queue.qsize()


class Broadcaster(Protocol):
    async def publish(self, entries: Sequence[LedgerEntry]) -> None:
        """Tell the listeners of each entry's account (after commit; never raises)."""
        ...

    def listen(self, account_id: str) -> AbstractAsyncContextManager[Listener]:
        """Listen to one account while the block runs: events published once the block
        has been entered are delivered."""
        ...

    async def close(self) -> None: ...


# ---------------------------------------------------------------- in one process


class InProcessBroadcaster:
    def __init__(self) -> None:
        self._listeners: dict[str, set[Listener]] = {}

    async def publish(self, entries: Sequence[LedgerEntry]) -> None:
        for entry in entries:
            for listener in list(self._listeners.get(entry.account_id, ())):
                listener.put(BalanceEvent(entry.account_id, entry))

    @asynccontextmanager
    async def listen(self, account_id: str) -> AsyncIterator[Listener]:
        listener = Listener(account_id)
        self._listeners.setdefault(account_id, set()).add(listener)
        try:
            yield listener
        finally:
            listeners = self._listeners.get(account_id, set())
            listeners.discard(listener)
            if not listeners:
                self._listeners.pop(account_id, None)

    async def close(self) -> None:
        self._listeners.clear()


# ---------------------------------------------------------------- Redis pub/sub


def channel_prefix(redis_url: str) -> str:
    """Channels are server-wide (the database number doesn't separate them): name the
    database in the channel, so deployments sharing a Redis server stay apart."""
    parts = urlsplit(redis_url)
    db = parts.path.strip("/") or "0"
    return f"credits:db{db}:balance:"


def encode(entry: LedgerEntry) -> str:
    def opt(value: object) -> str | None:
        return None if value is None else str(value)

    return orjson.dumps(
        {
            "id": str(entry.id),
            "account_id": entry.account_id,
            "created_at": entry.created_at.isoformat(),
            "type": TransactionType(entry.type).value,
            "process_type": ProcessType(entry.process_type).value,
            "credits": entry.credits,
            "balance_after": entry.balance_after,
            "quantity": entry.quantity,
            "user_id": entry.user_id,
            "description": entry.description,
            "reference": entry.reference,
            "payment_id": opt(entry.payment_id),
            "reverses_entry_id": opt(entry.reverses_entry_id),
        }
    ).decode()


def decode(data: str | bytes) -> LedgerEntry:
    raw: dict[str, Any] = json.loads(data)

    def opt_uuid(value: Any) -> uuid.UUID | None:
        return None if value is None else uuid.UUID(str(value))

    return LedgerEntry(
        id=uuid.UUID(raw["id"]),
        account_id=str(raw["account_id"]),
        created_at=datetime.fromisoformat(raw["created_at"]),
        type=TransactionType(raw["type"]),
        process_type=ProcessType(raw["process_type"]),
        credits=int(raw["credits"]),
        balance_after=int(raw["balance_after"]),
        quantity=None if raw["quantity"] is None else int(raw["quantity"]),
        user_id=raw["user_id"],
        description=str(raw["description"]),
        reference=raw["reference"],
        payment_id=opt_uuid(raw["payment_id"]),
        reverses_entry_id=opt_uuid(raw["reverses_entry_id"]),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBroadcaster:
    """Publishes with ``redis``; listens through one pub/sub connection, opened when the
    first local listener arrives, and subscribed to the channels of the accounts local
    listeners follow (a SUBSCRIBE is confirmed before ``listen`` returns)."""

    def __init__(self, redis: Redis, prefix: str, *, owns_client: bool = False) -> None:
        self.redis = redis
        self.prefix = prefix
        self._owns_client = owns_client
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._listeners: dict[str, set[Listener]] = {}  # by channel
        self._confirmed: set[str] = set()
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._lock = asyncio.Lock()
        self._outage = Outage("Redis (live balance publish)", log)
        self._outbox: list[tuple[str, str]] = []  # (channel, event) waiting to be sent
        self._senders: list[asyncio.Future[None]] = []  # the publishes waiting on them
        self._sender: asyncio.Task[None] | None = None

    @classmethod
    def connect(cls, redis_url: str, prefix: str | None = None) -> RedisBroadcaster:
        """A broadcaster with a client of its own (nothing is connected until used)."""
        from redis.asyncio import Redis

        client = Redis.from_url(redis_url, socket_connect_timeout=SUBSCRIBE_TIMEOUT)
        return cls(client, prefix or channel_prefix(redis_url), owns_client=True)

    def channel(self, account_id: str) -> str:
        return self.prefix + account_id

    async def publish(self, entries: Sequence[LedgerEntry]) -> None:
        """Returns once the entries were sent (or could not be). Publishes made while
        another batch is on its way go together in the next one (one pipeline, one round
        trip), in the order they were made: under load, many spends share a round trip."""
        if not entries:
            return
        self._outbox.extend((self.channel(e.account_id), encode(e)) for e in entries)
        sent = asyncio.get_running_loop().create_future()
        self._senders.append(sent)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send(), name="live-balance-publish")
        await sent

    async def _send(self) -> None:
        while self._outbox:
            messages, self._outbox = self._outbox, []
            waiting, self._senders = self._senders, []
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for channel, data in messages:
                        pipe.publish(channel, data)
                    await pipe.execute()
            except Exception as exc:  # committed anyway: listeners catch up with the next event
                self._outage.failed(exc)  # one warning per outage
                log.debug("could not publish %d balance change(s): %s", len(messages), exc)
            else:
                self._outage.recovered()
            finally:
                for sent in waiting:
                    if not sent.done():
                        sent.set_result(None)

    @asynccontextmanager
    async def listen(self, account_id: str) -> AsyncIterator[Listener]:
        channel = self.channel(account_id)
        listener = Listener(account_id)
        try:
            try:
                await self._add(channel, listener)
            except (OSError, TimeoutError, RedisError) as exc:
                log.warning("live balance: cannot listen to %s: %s", channel, exc)
                raise LiveUnavailable(str(exc)) from exc
            yield listener
        finally:
            await self._remove(channel, listener)

    async def _add(self, channel: str, listener: Listener) -> None:
        async with self._lock:
            pubsub = await self._start()
            listeners = self._listeners.setdefault(channel, set())
            first = not listeners
            listeners.add(listener)
            waiter = self._waiting.get(channel)
            if first:
                waiter = self._waiting[channel] = asyncio.get_running_loop().create_future()
                await pubsub.subscribe(channel)
        if waiter is not None:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                await asyncio.shield(waiter)

    async def _remove(self, channel: str, listener: Listener) -> None:
        async with self._lock:
            listeners = self._listeners.get(channel)
            if listeners is None:
                return
            listeners.discard(listener)
            if listeners:
                return
            del self._listeners[channel]
            self._confirmed.discard(channel)
            waiter = self._waiting.pop(channel, None)
            if waiter is not None and not waiter.done():
                waiter.cancel()
            if self._pubsub is not None:
                try:
                    await self._pubsub.unsubscribe(channel)
                except Exception as exc:  # Redis away: nobody listens, events are ignored
                    log.warning("could not unsubscribe from %s: %s", channel, exc)

    async def _start(self) -> PubSub:
        if self._pubsub is None:
            pubsub = self.redis.pubsub()
            await pubsub.connect()  # type: ignore[no-untyped-call]
            self._pubsub = pubsub
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read(self._pubsub), name="live-balance")
        return self._pubsub

    async def _read(self, pubsub: PubSub) -> None:
        failing = False
        while True:
            try:
                message = await pubsub.get_message(timeout=READ_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reconnects (and re-subscribes) on the next read
                if not failing:
                    log.warning("live balance: Redis pub/sub lost (%s); reconnecting", exc)
                failing = True
                await asyncio.sleep(RECONNECT_DELAY)
                continue
            if failing:
                log.info("live balance: Redis pub/sub is back")
                failing = False
            if message is not None:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        channel = _text(message.get("channel"))
        if kind == "message":
            self._deliver(channel, message)
        elif kind == "subscribe":
            self._subscribed(channel)

    def _deliver(self, channel: str, message: dict[str, Any]) -> None:
        """A balance event published on ``channel``: to each of its listeners."""
        try:
            entry = decode(message["data"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a malformed balance event on %s: %s", channel, exc)
            return
        for listener in list(self._listeners.get(channel, ())):
            listener.put(BalanceEvent(entry.account_id, entry))

    def _subscribed(self, channel: str) -> None:
        """Redis confirmed a subscription to ``channel`` (again, after a reconnect: its
        listeners may have missed events, so each is told to read the balance again)."""
        if channel in self._confirmed:
            for listener in list(self._listeners.get(channel, ())):
                listener.put(BalanceEvent(listener.account_id, None))
        elif channel in self._listeners:
            self._confirmed.add(channel)
        waiter = self._waiting.pop(channel, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def close(self) -> None:
        if self._sender is not None:
            with contextlib.suppress(Exception):
                await self._sender  # what was published is sent first
            self._sender = None
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
            self._pubsub = None
        if self._owns_client:
            await self.redis.aclose()
