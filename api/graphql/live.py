"""The live balance: ``creditBalanceChanged`` over graphql-transport-ws."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager

import strawberry
from graphql import GraphQLError

from api.graphql.run import caller
from api.graphql.types import CtxInfo
from api.graphql.types.history import CreditBalanceChange, transaction_or_none
from billing.ledger import posting
from runtime.live import BalanceEvent, Broadcaster, Listener, LiveUnavailable


@strawberry.subscription(
    description="The caller's account balance as it changes (admins; over "
    "graphql-transport-ws, the token in connection_init's payload as "
    '{"authorization": "Bearer <token>"}). The first event is the balance when the '
    "subscription starts (transaction null); then one per ledger entry: spends, "
    "purchases, recharges, grants, corrections, refunds. Ends with an UNAUTHENTICATED "
    "error when the token expires."
)
async def credit_balance_changed(info: CtxInfo) -> AsyncGenerator[CreditBalanceChange, None]:
    caller(info)
    return _balance_changes(info)


async def _balance_changes(info: CtxInfo) -> AsyncGenerator[CreditBalanceChange, None]:
    ctx = info.context
    account_id = ctx.principal.account_id
    async with _listening(ctx.live, account_id) as events:  # listening before the first read
        yield CreditBalanceChange(balance=await posting.balance_of(account_id), transaction=None)
        while True:
            event = await _next_event(info, events)
            ctx.fresh_loaders()  # the socket's context lives on: don't serve stale rows
            entry = event.entry
            # The last event of a burst reads the balance again, so the newest figure shown
            # is right even if events from several processes arrived out of order.
            balance = (
                entry.balance_after
                if entry is not None and events.pending()
                else await posting.balance_of(account_id)
            )
            yield CreditBalanceChange(balance=balance, transaction=transaction_or_none(entry))


@asynccontextmanager
async def _listening(live: Broadcaster, account_id: str) -> AsyncIterator[Listener]:
    try:
        async with live.listen(account_id) as events:
            yield events
    except LiveUnavailable:
        raise GraphQLError(
            "Live updates are unavailable right now: try again shortly.",
            extensions={"code": "SERVICE_UNAVAILABLE"},
        ) from None


async def _next_event(info: CtxInfo, events: Listener) -> BalanceEvent:
    expires_at = info.context.token_expires_at
    if expires_at is None:
        return await events.get()
    try:
        async with asyncio.timeout(max(0.0, expires_at - time.time())):
            return await events.get()
    except TimeoutError:
        raise GraphQLError(
            "The token has expired: subscribe again with a new one.",
            extensions={"code": "UNAUTHENTICATED"},
        ) from None
