"""GraphQL types, named exactly as in the shared contract."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import strawberry
from strawberry.types import Info

from api import ids
from api.context import Context, bad_input
from billing import enums, history, insights, invoices
from billing.errors import UserError as DomainError
from billing.errors import Validator
from billing.models import Account, AutoRechargeSetting, LedgerEntry
from billing.models import Card as CardModel
from billing.models import Invoice as InvoiceModel
from billing.models import MeteredUsage as MeteredUsageModel
from billing.models import Payment as PaymentModel
from billing.notifications import lowbalance
from billing.payments.cards import active_cards, primary_card
from billing.pricing import PriceBook
from billing.recharge.autorecharge import get_setting
from billing.spending import quota

Role = strawberry.enum(enums.Role)
TransactionType = strawberry.enum(enums.TransactionType)
ProcessType = strawberry.enum(enums.ProcessType)
BillingMode = strawberry.enum(enums.BillingMode)
PaymentStatus = strawberry.enum(enums.PaymentStatus)
AutoRechargeTrigger = strawberry.enum(enums.AutoRechargeTrigger)
ErrorCode = strawberry.enum(enums.ErrorCode)
InvoiceStatus = strawberry.enum(enums.InvoiceStatus)
AutoRechargeStatus = strawberry.enum(
    enums.AutoRechargeStatus,
    description="OFF: not enabled (its configuration is kept); ACTIVE: will recharge; "
    "PAUSED: enabled but stopped (pausedReason says why; saving the setting resumes it).",
)
UsageInterval = strawberry.enum(insights.UsageInterval)

CtxInfo = Info[Context, None]


@strawberry.type
class UserError:
    code: ErrorCode
    field: list[str] | None
    message: str

    @classmethod
    def of(cls, error: DomainError) -> UserError:
        return cls(
            code=error.code,
            field=list(error.field) if error.field else None,
            message=error.message,
        )


@strawberry.type
class Viewer:
    user_id: strawberry.ID
    account_id: strawberry.ID
    roles: list[Role]
    email: str | None
    name: str | None


@strawberry.type
class ProcessPrice:
    process_type: ProcessType
    billing: BillingMode
    credits_per_unit: int | None
    free_monthly_quota: int | None
    cents_per_unit: int | None


@strawberry.type
class CreditPricing:
    cents_per_credit: int
    currency: str
    min_purchase_credits: int
    max_purchase_credits: int
    processes: list[ProcessPrice]
    version: str = strawberry.field(description="The price book's version.")

    @classmethod
    def of(cls, book: PriceBook) -> CreditPricing:
        return cls(
            cents_per_credit=book.cents_per_credit,
            currency=book.currency,
            min_purchase_credits=book.min_purchase_credits,
            max_purchase_credits=book.max_purchase_credits,
            version=book.version,
            processes=[
                ProcessPrice(
                    process_type=p.process_type,
                    billing=p.billing,
                    credits_per_unit=p.credits_per_unit,
                    free_monthly_quota=p.free_monthly_quota,
                    cents_per_unit=p.cents_per_unit,
                )
                for p in book.processes
            ],
        )


@strawberry.type
class BillingAddress:
    line1: str | None
    line2: str | None
    city: str | None
    state: str | None
    postal_code: str | None
    country: str | None


@strawberry.input
class BillingAddressInput:
    line1: str | None = None
    line2: str | None = None
    city: str | None = None
    state: str | None = None
    postal_code: str | None = None
    country: str | None = None


@strawberry.type
class Card:
    model: strawberry.Private[CardModel]

    @strawberry.field
    def id(self) -> strawberry.ID:
        return strawberry.ID(ids.encode("Card", self.model.id))

    @strawberry.field
    def brand(self) -> str:
        return self.model.brand

    @strawberry.field
    def last4(self) -> str:
        return self.model.last4

    @strawberry.field
    def exp_month(self) -> int:
        return self.model.exp_month

    @strawberry.field
    def exp_year(self) -> int:
        return self.model.exp_year

    @strawberry.field
    def cardholder_name(self) -> str | None:
        return self.model.cardholder_name

    @strawberry.field
    def billing_address(self) -> BillingAddress | None:
        m = self.model
        parts = (
            m.address_line1,
            m.address_line2,
            m.address_city,
            m.address_state,
            m.address_postal_code,
            m.address_country,
        )
        if all(p is None for p in parts):
            return None
        return BillingAddress(
            line1=m.address_line1,
            line2=m.address_line2,
            city=m.address_city,
            state=m.address_state,
            postal_code=m.address_postal_code,
            country=m.address_country,
        )

    @strawberry.field
    def is_primary(self) -> bool:
        return self.model.is_primary

    @strawberry.field
    def created_at(self) -> datetime:
        return self.model.created_at

    @strawberry.field(description="Set when the card was removed (shown on old payments).")
    def removed_at(self) -> datetime | None:
        return self.model.removed_at


def card_or_none(model: CardModel | None) -> Card | None:
    return Card(model=model) if model is not None else None


@strawberry.type
class Member:
    user_id: strawberry.ID
    email: str | None
    name: str | None


@strawberry.type
class Payment:
    model: strawberry.Private[PaymentModel]

    @strawberry.field
    def id(self) -> strawberry.ID:
        return strawberry.ID(ids.encode("Payment", self.model.id))

    @strawberry.field
    def status(self) -> PaymentStatus:
        return self.model.status

    @strawberry.field
    def credits(self) -> int:
        return self.model.credits

    @strawberry.field
    def amount_cents(self) -> int:
        return self.model.amount_cents

    @strawberry.field
    def currency(self) -> str:
        return self.model.currency

    @strawberry.field
    def client_secret(self) -> str | None:
        if self.model.status is enums.PaymentStatus.REQUIRES_ACTION:
            return self.model.client_secret
        return None

    @strawberry.field
    def failure_message(self) -> str | None:
        return self.model.failure_message

    @strawberry.field
    async def card(self, info: CtxInfo) -> Card | None:
        if self.model.card_id is None:
            return None
        return card_or_none(await info.context.cards.load(self.model.card_id))

    @strawberry.field
    def created_at(self) -> datetime:
        return self.model.created_at


def payment_or_none(model: PaymentModel | None) -> Payment | None:
    return Payment(model=model) if model is not None else None


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
        return self.model.credits

    @strawberry.field
    def balance_after(self) -> int:
        return self.model.balance_after

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
        return payment_or_none(await info.context.payments.load(self.model.payment_id))


def transaction_or_none(model: LedgerEntry | None) -> CreditTransaction | None:
    return CreditTransaction(model=model) if model is not None else None


@strawberry.type
class PageInfo:
    has_next_page: bool
    has_previous_page: bool
    start_cursor: str | None
    end_cursor: str | None


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


def history_filter(flt: TransactionFilter | None) -> history.HistoryFilter:
    if flt is None:
        return history.HistoryFilter()
    return history.HistoryFilter(
        from_=_utc(flt.from_),
        to=_utc(flt.to),
        types=list(flt.types or []),
        process_types=list(flt.process_types or []),
        user_ids=[str(u) for u in flt.user_ids or []],
        search=flt.search or None,
    )


def _utc(value: datetime | None) -> datetime | None:
    """Any offset becomes UTC (SQLite compares stored times as UTC text); none means UTC."""
    if value is None:
        return None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:00:00-05:00 is past the last representable UTC time
        raise bad_input(f"{value.isoformat()} is out of range in UTC") from None


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


@strawberry.type
class AutoRecharge:
    model: strawberry.Private[AutoRechargeSetting]

    @strawberry.field
    def enabled(self) -> bool:
        return self.model.enabled

    @strawberry.field
    def trigger(self) -> AutoRechargeTrigger | None:
        return self.model.trigger

    @strawberry.field
    def interval_days(self) -> int | None:
        return self.model.interval_days

    @strawberry.field
    def threshold_credits(self) -> int | None:
        return self.model.threshold_credits

    @strawberry.field
    def recharge_credits(self) -> int | None:
        return self.model.recharge_credits

    @strawberry.field
    def use_primary_card(self) -> bool:
        return self.model.use_primary_card

    @strawberry.field(description="The card recharges use: the pinned card, or the primary.")
    async def card(self, info: CtxInfo) -> Card | None:
        if not self.model.use_primary_card and self.model.card_id is not None:
            return card_or_none(await info.context.cards.load(self.model.card_id))
        return card_or_none(await primary_card(self.model.account_id))

    @strawberry.field
    def notify(self) -> bool:
        return self.model.notify

    @strawberry.field
    def notify_emails(self) -> list[str]:
        return list(self.model.notify_emails or [])

    @strawberry.field
    def monthly_limit_credits(self) -> int | None:
        return self.model.monthly_limit_credits

    @strawberry.field
    def next_run_at(self) -> datetime | None:
        return self.model.next_run_at

    @strawberry.field
    def last_run_at(self) -> datetime | None:
        return self.model.last_run_at

    @strawberry.field
    def consecutive_failures(self) -> int:
        return self.model.consecutive_failures

    @strawberry.field
    def paused_reason(self) -> str | None:
        return self.model.paused_reason

    @strawberry.field(description="Whether it will recharge, in one word.")
    def status(self) -> AutoRechargeStatus:
        if not self.model.enabled:
            return enums.AutoRechargeStatus.OFF
        if self.model.paused_reason is not None:
            return enums.AutoRechargeStatus.PAUSED
        return enums.AutoRechargeStatus.ACTIVE


@strawberry.type
class FreeQuota:
    process_type: ProcessType
    allowance: int
    used: int
    period_start: datetime
    period_end: datetime


@strawberry.type(description="One process type's metered usage on an invoice.")
class InvoiceLine:
    process_type: ProcessType
    quantity: int
    amount_cents: int


@strawberry.type(description="A month of metered usage, charged to the card on file.")
class Invoice:
    model: strawberry.Private[InvoiceModel]

    @strawberry.field
    def id(self) -> strawberry.ID:
        return strawberry.ID(ids.encode("Invoice", self.model.id))

    @strawberry.field(description="Start of the month (the account's time zone), inclusive.")
    def period_start(self) -> datetime:
        return self.model.period_start

    @strawberry.field(description="End of the month (the account's time zone), exclusive.")
    def period_end(self) -> datetime:
        return self.model.period_end

    @strawberry.field
    def status(self) -> InvoiceStatus:
        return self.model.status

    @strawberry.field(description="What is charged: this month's usage plus any amount carried in.")
    def amount_cents(self) -> int:
        return self.model.amount_cents

    @strawberry.field(
        description="Cents of earlier months carried into this invoice, each under the "
        "payment gateway's minimum charge (those invoices are CARRIED_FORWARD)."
    )
    def carried_in_cents(self) -> int:
        return int(self.model.carried_in_cents)

    @strawberry.field
    def currency(self) -> str:
        return self.model.currency

    @strawberry.field(description="Charge attempts made so far.")
    def attempts(self) -> int:
        return self.model.attempts

    @strawberry.field
    def paid_at(self) -> datetime | None:
        return self.model.paid_at

    @strawberry.field(description="Why the last charge attempt failed.")
    def failure_message(self) -> str | None:
        return self.model.failure_message

    @strawberry.field
    def lines(self) -> list[InvoiceLine]:
        return [
            InvoiceLine(
                process_type=line.process_type,
                quantity=line.quantity,
                amount_cents=line.amount_cents,
            )
            for line in sorted(self.model.lines, key=lambda line: line.process_type.value)
        ]


@strawberry.type(
    description="Admins get one BALANCE_LOW e-mail each time the balance falls below "
    "levelCredits: by a spend (or any debit) from at or above it, or when a new level is set "
    "above a balance that was not low before. It is sent again only after the balance has "
    "been back at or above the level."
)
class LowBalanceAlert:
    enabled: bool
    level_credits: int | None
    is_low: bool = strawberry.field(description="The balance is below the level now.")

    @classmethod
    def of(cls, alert: lowbalance.LowBalanceAlert) -> LowBalanceAlert:
        return cls(enabled=alert.enabled, level_credits=alert.level_credits, is_low=alert.is_low)


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
class PaymentEdge:
    cursor: str
    node: Payment


@strawberry.type
class PaymentConnection:
    edges: list[PaymentEdge]
    page_info: PageInfo


@strawberry.type(
    description="What one process type used in one interval (intervals start at midnight, "
    "or on the 1st, in the account's time zone). Free-quota units and metered units count "
    "here although they cost no credits."
)
class UsageBucket:
    start: datetime
    process_type: ProcessType
    units: int
    free_units: int
    credits: int
    metered_cents: int


async def payments_page(
    account_id: str,
    statuses: list[enums.PaymentStatus] | None,
    first: int | None,
    after: str | None,
) -> PaymentConnection:
    count = 25 if first is None else first
    wanted = list(statuses or [])
    v = Validator()
    insights.validate_payments(v, count, wanted)
    if v.errors:
        raise bad_input("; ".join(e.message for e in v.errors))
    position = None
    if after is not None:
        position = ids.decode_cursor(after)
        if position is None:
            raise bad_input("after is not a cursor this API issued")
    result = await insights.payments_page(account_id, wanted, count, position)
    edges = [
        PaymentEdge(cursor=ids.encode_cursor(p.created_at, p.id), node=Payment(model=p))
        for p in result.payments
    ]
    return PaymentConnection(
        edges=edges,
        page_info=PageInfo(
            has_next_page=result.has_next,
            has_previous_page=after is not None,
            start_cursor=edges[0].cursor if edges else None,
            end_cursor=edges[-1].cursor if edges else None,
        ),
    )


@strawberry.type
class CreditAccount:
    model: strawberry.Private[Account]

    @strawberry.field
    def id(self) -> strawberry.ID:
        return strawberry.ID(self.model.id)

    @strawberry.field
    def balance(self) -> int:
        return self.model.balance

    @strawberry.field(
        description="Set when billing staff should look at the account: a disputed card "
        "payment, or a refund larger than the balance."
    )
    def flagged_reason(self) -> str | None:
        return self.model.flag_reason

    @strawberry.field
    def flagged_at(self) -> datetime | None:
        return self.model.flagged_at

    @strawberry.field(description="The e-mail the admins get when the balance falls low.")
    def low_balance_alert(self) -> LowBalanceAlert:
        return LowBalanceAlert.of(
            lowbalance.LowBalanceAlert(self.model.low_balance_level, self.model.balance)
        )

    @strawberry.field
    async def cards(self) -> list[Card]:
        return [Card(model=c) for c in await active_cards(self.model.id)]

    @strawberry.field
    async def auto_recharge(self) -> AutoRecharge:
        return AutoRecharge(model=await get_setting(self.model.id))

    @strawberry.field
    async def free_quotas(self, info: CtxInfo) -> list[FreeQuota]:
        return [
            FreeQuota(
                process_type=q.process_type,
                allowance=q.allowance,
                used=q.used,
                period_start=q.period_start,
                period_end=q.period_end,
            )
            for q in await quota.quota_status(self.model, info.context.book)
        ]

    @strawberry.field
    async def transactions(
        self,
        info: CtxInfo,
        filter: TransactionFilter | None = None,
        first: int | None = 25,
        after: str | None = None,
    ) -> CreditTransactionConnection:
        return await transactions_page(self.model.id, filter, first, after)

    @strawberry.field(
        description="Card payments of every kind (purchases, auto-recharges, invoices), "
        "newest first, keyset-paginated; a purchase waiting for 3-D Secure is "
        "statuses: [REQUIRES_ACTION]."
    )
    async def payments(
        self,
        statuses: list[PaymentStatus] | None = None,
        first: int | None = 25,
        after: str | None = None,
    ) -> PaymentConnection:
        return await payments_page(self.model.id, statuses, first, after)

    @strawberry.field(
        description="Buckets with any use in [from, to), oldest first; at most 400 days."
    )
    async def usage(
        self,
        info: CtxInfo,
        from_: Annotated[datetime, strawberry.argument(name="from")],
        to: datetime,
        interval: UsageInterval | None = insights.UsageInterval.DAY,
    ) -> list[UsageBucket]:
        start, end = _utc(from_), _utc(to)
        assert start is not None and end is not None
        v = Validator()
        insights.validate_usage(v, start, end)
        if v.errors:
            raise bad_input("; ".join(e.message for e in v.errors))
        buckets = await insights.usage(
            self.model, info.context.book, start, end, interval or insights.UsageInterval.DAY
        )
        return [
            UsageBucket(
                start=b.start,
                process_type=b.process_type,
                units=b.units,
                free_units=b.free_units,
                credits=b.credits,
                metered_cents=b.metered_cents,
            )
            for b in buckets
        ]

    @strawberry.field(description="Monthly invoices for metered usage, newest first (24 at most).")
    async def invoices(self) -> list[Invoice]:
        return [Invoice(model=m) for m in await invoices.account_invoices(self.model.id)]


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
        return self.model.amount_cents

    @strawberry.field
    def created_at(self) -> datetime:
        return self.model.created_at
