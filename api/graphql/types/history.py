"""The ledger as GraphQL sees it: transactions, their keyset pages and filter, the live
balance change, and metered usage."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import cast

import strawberry

from api import ids
from api.context import bad_input
from api.graphql.types import CtxInfo, Member, PageInfo, ProcessType, TransactionType
from api.graphql.types.payments import Payment, payment_or_none
from billing import clock, history
from billing.errors import Validator
from billing.models import LedgerEntry
from billing.models import MeteredUsage as MeteredUsageModel


@strawberry.type
class CreditTransaction:
    model: strawberry.Private[LedgerEntry]

    @strawberry.field
    def id(self) -> strawberry.ID:
        return strawberry.ID(ids.encode("CreditTransaction", self.model.id))

    @strawberry.field
    def created_at(self) -> datetime:
        return self.model.created_at

    @strawberry.field
    def type(self) -> TransactionType:
        return self.model.type

    @strawberry.field
    def process_type(self) -> ProcessType:
        return self.model.process_type

    @strawberry.field
    def credits(self) -> int:
        return int(self.model.credits)

    @strawberry.field
    def balance_after(self) -> int:
        return int(self.model.balance_after)

    @strawberry.field
    def quantity(self) -> int | None:
        return self.model.quantity

    @strawberry.field
    async def user(self, info: CtxInfo) -> Member | None:
        user_id = self.model.user_id
        if user_id is None:
            return None
        member = await info.context.members.load((self.model.account_id, user_id))
        return Member(
            user_id=strawberry.ID(user_id),
            email=member.email if member else None,
            name=member.name if member else None,
        )

    @strawberry.field
    def description(self) -> str:
        return self.model.description

    @strawberry.field
    def reference(self) -> str | None:
        return self.model.reference

    @strawberry.field
    async def payment(self, info: CtxInfo) -> Payment | None:
        if self.model.payment_id is None:
            return None
        return payment_or_none(
            await info.context.payments.load(cast(uuid.UUID, self.model.payment_id))
        )


def transaction_or_none(model: LedgerEntry | None) -> CreditTransaction | None:
    return CreditTransaction(model=model) if model is not None else None


@strawberry.type
class CreditTransactionEdge:
    cursor: str
    node: CreditTransaction


@strawberry.type
class CreditTransactionConnection:
    edges: list[CreditTransactionEdge]
    page_info: PageInfo


@strawberry.input
class TransactionFilter:
    from_: datetime | None = strawberry.field(default=None, name="from")
    to: datetime | None = None
    types: list[TransactionType] | None = None
    process_types: list[ProcessType] | None = None
    user_ids: list[strawberry.ID] | None = None
    search: str | None = None


def utc(value: datetime) -> datetime:
    """``billing.clock.utc``, out of range being the caller's bad input."""
    try:
        return clock.utc(value)
    except ValueError as exc:
        raise bad_input(str(exc)) from None


def history_filter(flt: TransactionFilter | None) -> history.HistoryFilter:
    if flt is None:
        return history.HistoryFilter()
    return history.HistoryFilter(
        from_=utc(flt.from_) if flt.from_ is not None else None,
        to=utc(flt.to) if flt.to is not None else None,
        types=list(flt.types or []),
        process_types=list(flt.process_types or []),
        user_ids=[str(u) for u in flt.user_ids or []],
        search=flt.search or None,
    )


async def transactions_page(
    account_id: str, flt: TransactionFilter | None, first: int | None, after: str | None
) -> CreditTransactionConnection:
    count = 25 if first is None else first
    parsed = history_filter(flt)
    v = Validator()
    history.validate(v, parsed, count)
    if v.errors:
        raise bad_input("; ".join(e.message for e in v.errors))
    position = None
    if after is not None:
        position = ids.decode_cursor(after)
        if position is None:
            raise bad_input("after is not a cursor this API issued")
    result = await history.page(account_id, parsed, count, position)
    edges = [
        CreditTransactionEdge(
            cursor=ids.encode_cursor(e.created_at, e.id), node=CreditTransaction(model=e)
        )
        for e in result.entries
    ]
    return CreditTransactionConnection(
        edges=edges,
        page_info=PageInfo(
            has_next_page=result.has_next,
            has_previous_page=after is not None,
            start_cursor=edges[0].cursor if edges else None,
            end_cursor=edges[-1].cursor if edges else None,
        ),
    )


@strawberry.type(
    description="A change of the account's balance, as it happens (creditBalanceChanged)."
)
class CreditBalanceChange:
    balance: int = strawberry.field(
        description="The balance now (read again for the latest change of a burst)."
    )
    transaction: CreditTransaction | None = strawberry.field(
        description="The entry that changed it; null for the first event of a subscription "
        "(the balance when it started) and after a gap in the feed (read the history again)."
    )


@strawberry.type
class MeteredUsage:
    model: strawberry.Private[MeteredUsageModel]

    @strawberry.field
    def id(self) -> strawberry.ID:
        return strawberry.ID(ids.encode("MeteredUsage", self.model.id))

    @strawberry.field
    def process_type(self) -> ProcessType:
        return self.model.process_type

    @strawberry.field
    def quantity(self) -> int:
        return self.model.quantity

    @strawberry.field
    def amount_cents(self) -> int:
        return int(self.model.amount_cents)

    @strawberry.field
    def created_at(self) -> datetime:
        return self.model.created_at
