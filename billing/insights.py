"""What the billing page shows at a glance: usage by interval and process type, and the
account's card payments. Both are computed by the database (GROUP BY over the indexed
columns, keyset pages); no ledger entry is loaded into Python."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from tortoise.expressions import Q

from billing import sql
from billing.enums import PaymentStatus, ProcessType, TransactionType
from billing.errors import Validator
from billing.history import Position
from billing.invoices import zone_name
from billing.models import Account, Payment
from billing.pricing import PriceBook

MAX_USAGE_DAYS = 400
MAX_PAYMENT_PAGE = 100


class UsageInterval(StrEnum):
    DAY = "DAY"
    MONTH = "MONTH"


@dataclass(slots=True)
class UsageBucket:
    start: datetime
    process_type: ProcessType
    units: int = 0
    free_units: int = 0
    credits: int = 0
    metered_cents: int = 0


def validate_usage(v: Validator, start: datetime, end: datetime) -> None:
    if start >= end:
        v.add("from must be before to", "from")
    elif end - start > timedelta(days=MAX_USAGE_DAYS):
        v.add(f"from and to may be at most {MAX_USAGE_DAYS} days apart", "to")


def _bucket_start(local: datetime, interval: UsageInterval) -> datetime:
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    return day.replace(day=1) if interval is UsageInterval.MONTH else day


@dataclass(frozen=True, slots=True)
class _Grouping:
    """How rows are grouped into the account's local days or months."""

    tz: ZoneInfo
    interval: UsageInterval
    postgres: bool

    def key(self, column: str) -> str:
        if self.postgres:  # exact local midnights (or 1sts) from the database itself
            unit = "month" if self.interval is UsageInterval.MONTH else "day"
            return f"date_trunc('{unit}', {column} AT TIME ZONE '{_quoted(self.tz.key)}')"
        # SQLite has no time zones: group by the UTC hour, fold the hours into local
        # intervals below (a zone with a half-hour offset is off by that half hour).
        return f"substr({column}, 1, 13)"

    def local_start(self, raw: object) -> datetime:
        if self.postgres:
            assert isinstance(raw, datetime)
            return raw.replace(tzinfo=self.tz)
        hour = datetime.strptime(str(raw), "%Y-%m-%d %H").replace(tzinfo=UTC)
        return _bucket_start(hour.astimezone(self.tz), self.interval)


class _Buckets:
    """The usage buckets, by (UTC start, process type), as the rows are added."""

    def __init__(self, grouping: _Grouping, book: PriceBook) -> None:
        self.grouping = grouping
        self.per_unit = {p.process_type: p.credits_per_unit or 1 for p in book.processes}
        self.found: dict[tuple[datetime, ProcessType], UsageBucket] = {}

    def bucket(self, row: dict[str, Any]) -> UsageBucket:
        at = self.grouping.local_start(row["k"]).astimezone(UTC)
        pt = ProcessType(str(row["process_type"]))
        found = self.found.get((at, pt))
        if found is None:
            found = self.found[(at, pt)] = UsageBucket(at, pt)
        return found

    def add_ledger(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            b = self.bucket(row)
            spent = int(row["credits"] or 0)
            # Paid units: every entry's credits are its units times the price, so the sum
            # divides exactly (net of reversals, which give back theirs).
            b.units += spent // self.per_unit.get(b.process_type, 1)
            b.credits += spent

    def add_free(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            b = self.bucket(row)
            b.units += int(row["used"] or 0)
            b.free_units += int(row["used"] or 0)

    def add_metered(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            b = self.bucket(row)
            b.units += int(row["units"] or 0)
            b.metered_cents += int(row["cents"] or 0)

    def used(self) -> list[UsageBucket]:
        """The buckets with any use, oldest first."""
        return sorted(
            (
                b
                for b in self.found.values()
                if b.units or b.free_units or b.credits or b.metered_cents
            ),
            key=lambda b: (b.start, b.process_type.value),
        )


async def usage(
    account: Account,
    book: PriceBook,
    start: datetime,
    end: datetime,
    interval: UsageInterval,
) -> list[UsageBucket]:
    """Buckets with any use in [start, end), oldest first (inputs validated, UTC).

    ``units`` counts every unit used: paid ones from the ledger (net of reversals), free
    ones (``free_quota_hour``, kept by a trigger on the monthly counter: a wholly free use
    writes no ledger entry) and metered ones."""
    postgres = sql.is_postgres(sql.connection())
    grouping = _Grouping(ZoneInfo(zone_name(account.timezone)), interval, postgres)
    buckets = _Buckets(grouping, book)
    buckets.add_ledger(
        await sql.fetch(
            f"SELECT {grouping.key('created_at')} AS k, process_type, SUM(-credits) AS credits "
            "FROM ledger_entry WHERE account_id = ? AND type IN (?, ?) "
            "AND created_at >= ? AND created_at < ? GROUP BY 1, 2",
            account.id,
            TransactionType.USAGE.value,
            TransactionType.REVERSAL.value,
            start,
            end,
        )
    )
    buckets.add_free(
        await sql.fetch(
            f"SELECT {grouping.key('hour_start')} AS k, process_type, SUM(used) AS used "
            "FROM free_quota_hour WHERE account_id = ? AND hour_start >= ? AND hour_start < ? "
            "GROUP BY 1, 2",
            account.id,
            *((start, end) if postgres else (_hour_text(start), _hour_text(end))),
        )
    )
    buckets.add_metered(
        await sql.fetch(
            f"SELECT {grouping.key('created_at')} AS k, process_type, SUM(quantity) AS units, "
            "SUM(amount_cents) AS cents FROM metered_usage "
            "WHERE account_id = ? AND created_at >= ? AND created_at < ? GROUP BY 1, 2",
            account.id,
            start,
            end,
        )
    )
    return buckets.used()


def _hour_text(at: datetime) -> str:
    """SQLite's free_quota_hour key for the hour containing ``at`` (the bound rounded up
    when it falls inside an hour, so [start, end) keeps whole hours)."""
    utc = at.astimezone(UTC)
    floor = utc.replace(minute=0, second=0, microsecond=0)
    if floor != utc:
        floor += timedelta(hours=1)
    return floor.strftime("%Y-%m-%d %H")


def _quoted(zone: str) -> str:
    return zone.replace("'", "''")


# ---------------------------------------------------------------- payments


@dataclass(frozen=True, slots=True)
class PaymentPage:
    payments: list[Payment]
    has_next: bool


def validate_payments(v: Validator, first: int, statuses: list[PaymentStatus]) -> None:
    if not 1 <= first <= MAX_PAYMENT_PAGE:
        v.add(f"first must be 1 to {MAX_PAYMENT_PAGE}", "first")
    if len(statuses) > len(PaymentStatus):
        v.add("statuses lists too many values", "statuses")


async def payments_page(
    account_id: str,
    statuses: list[PaymentStatus],
    first: int,
    after: Position | None,
) -> PaymentPage:
    """The account's card payments, newest first, keyset over ``(created_at, id)``."""
    query = Payment.filter(account_id=account_id)
    if statuses:
        query = query.filter(status__in=list(dict.fromkeys(statuses)))
    if after is not None:
        query = query.filter(created_at__lte=after.created_at).filter(
            Q(created_at__lt=after.created_at) | Q(id__lt=after.id)
        )
    rows = await query.order_by("-created_at", "-id").limit(first + 1)
    return PaymentPage(rows[:first], len(rows) > first)
