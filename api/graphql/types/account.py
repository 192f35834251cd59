"""The account and what is read about it: balance, pricing, settings, quotas, usage."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, cast

import strawberry

from api.context import bad_input
from api.graphql.types import (
    AutoRechargeStatus,
    AutoRechargeTrigger,
    BillingMode,
    CtxInfo,
    PaymentStatus,
    ProcessType,
    Role,
    UsageInterval,
)
from api.graphql.types.cards import Card, card_or_none
from api.graphql.types.history import (
    CreditTransactionConnection,
    TransactionFilter,
    transactions_page,
    utc,
)
from api.graphql.types.payments import Invoice, PaymentConnection, payments_page
from billing import enums, insights, invoices
from billing.errors import Validator
from billing.models import Account, AutoRechargeSetting
from billing.notifications import lowbalance
from billing.payments.cards import active_cards, primary_card
from billing.pricing import PriceBook
from billing.recharge.autorecharge import get_setting
from billing.spending import quota


def _int(value: int | None) -> int | None:
    return int(value) if value is not None else None


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
        return _int(self.model.threshold_credits)

    @strawberry.field
    def recharge_credits(self) -> int | None:
        return _int(self.model.recharge_credits)

    @strawberry.field
    def use_primary_card(self) -> bool:
        return self.model.use_primary_card

    @strawberry.field(description="The card recharges use: the pinned card, or the primary.")
    async def card(self, info: CtxInfo) -> Card | None:
        if not self.model.use_primary_card and self.model.card_id is not None:
            return card_or_none(await info.context.cards.load(cast(uuid.UUID, self.model.card_id)))
        return card_or_none(await primary_card(self.model.account_id))

    @strawberry.field
    def notify(self) -> bool:
        return self.model.notify

    @strawberry.field
    def notify_emails(self) -> list[str]:
        return list(self.model.notify_emails or [])

    @strawberry.field
    def monthly_limit_credits(self) -> int | None:
        return _int(self.model.monthly_limit_credits)

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


@strawberry.type
class CreditAccount:
    model: strawberry.Private[Account]

    @strawberry.field
    def id(self) -> strawberry.ID:
        return strawberry.ID(self.model.id)

    @strawberry.field
    def balance(self) -> int:
        return int(self.model.balance)

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
        start, end = utc(from_), utc(to)
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
