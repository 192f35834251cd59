"""What the billing page shows at a glance: usage by interval and process type, and the
account's card payments. Both are computed by the database (GROUP BY over the indexed
columns, keyset pages); no ledger entry is loaded into Python."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

from tortoise.expressions import Q

from billing import sql
from billing.enums import PaymentStatus, ProcessType, TransactionType
from billing.errors import Validator
from billing.history import Position
from billing.invoices import zone_name
from billing.models import Account, Payment
from billing.pricing import PriceBook
from billing.quota import month_bounds

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


def _per_unit_case(book: PriceBook) -> str:
    """``credits_per_unit`` of the entry's process type, as SQL (constants from the book)."""
    arms = " ".join(
        f"WHEN '{p.process_type.value}' THEN {int(p.credits_per_unit)}"
        for p in book.processes
        if p.credits_per_unit
    )
    return f"(CASE process_type {arms} ELSE 1 END)" if arms else "1"


def _bucket_start(local: datetime, interval: UsageInterval) -> datetime:
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    return day.replace(day=1) if interval is UsageInterval.MONTH else day


async def usage(
    account: Account,
    book: PriceBook,
    start: datetime,
    end: datetime,
    interval: UsageInterval,
) -> list[UsageBucket]:
    """Buckets with any use in [start, end), oldest first (inputs validated, UTC).

    ``units`` counts every unit used: paid ones from the ledger (net of reversals), free
    ones, and metered ones. Free units: for MONTH, the month's free-quota counter (exact);
    for DAY, those of the uses that were partly free (a use wholly covered by the free quota
    writes no ledger entry, so it shows only in the monthly figure)."""
    tz = ZoneInfo(zone_name(account.timezone))
    postgres = sql.is_postgres(sql.connection())
    per_unit = _per_unit_case(book)
    usage_types = (TransactionType.USAGE.value, TransactionType.REVERSAL.value)
    if postgres:
        # Exact local midnights (or 1sts) from the database itself.
        unit = "month" if interval is UsageInterval.MONTH else "day"
        key = f"date_trunc('{unit}', created_at AT TIME ZONE '{_quoted(tz.key)}')"
    else:
        # SQLite has no time zones: group by the UTC hour, fold the hours into local
        # intervals below (a zone with a half-hour offset is off by that half hour).
        key = "substr(created_at, 1, 13)"
    ledger_rows = await sql.fetch(
        f"SELECT {key} AS k, process_type, "
        f"SUM(CASE WHEN type = ? THEN COALESCE(quantity, 0) ELSE -credits / {per_unit} END)"
        " AS units, "
        f"SUM(CASE WHEN type = ? THEN COALESCE(quantity, 0) + credits / {per_unit} ELSE 0 END)"
        " AS free_units, "
        "SUM(-credits) AS credits "
        "FROM ledger_entry WHERE account_id = ? AND type IN (?, ?) "
        "AND created_at >= ? AND created_at < ? GROUP BY 1, 2",
        TransactionType.USAGE.value,
        TransactionType.USAGE.value,
        account.id,
        *usage_types,
        start,
        end,
    )
    metered_rows = await sql.fetch(
        f"SELECT {key} AS k, process_type, SUM(quantity) AS units, "
        "SUM(amount_cents) AS cents FROM metered_usage "
        "WHERE account_id = ? AND created_at >= ? AND created_at < ? GROUP BY 1, 2",
        account.id,
        start,
        end,
    )

    def local_start(raw: object) -> datetime:
        if postgres:
            assert isinstance(raw, datetime)
            naive = raw.replace(tzinfo=None)
            return naive.replace(tzinfo=tz)
        hour = datetime.strptime(str(raw), "%Y-%m-%d %H").replace(tzinfo=UTC)
        return _bucket_start(hour.astimezone(tz), interval)

    buckets: dict[tuple[datetime, ProcessType], UsageBucket] = {}

    def bucket(raw_start: datetime, process: str) -> UsageBucket:
        at = raw_start.astimezone(UTC)
        pt = ProcessType(process)
        found = buckets.get((at, pt))
        if found is None:
            found = buckets[(at, pt)] = UsageBucket(at, pt)
        return found

    for row in ledger_rows:
        b = bucket(local_start(row["k"]), row["process_type"])
        b.units += int(row["units"] or 0)
        b.free_units += max(0, int(row["free_units"] or 0))
        b.credits += int(row["credits"] or 0)
    for row in metered_rows:
        b = bucket(local_start(row["k"]), row["process_type"])
        b.units += int(row["units"] or 0)
        b.metered_cents += int(row["cents"] or 0)
    if interval is UsageInterval.MONTH:
        await _add_monthly_free_units(account, start, end, tz, buckets)
    return sorted(
        (b for b in buckets.values() if b.units or b.free_units or b.credits or b.metered_cents),
        key=lambda b: (b.start, b.process_type.value),
    )


async def _add_monthly_free_units(
    account: Account,
    start: datetime,
    end: datetime,
    tz: ZoneInfo,
    buckets: dict[tuple[datetime, ProcessType], UsageBucket],
) -> None:
    """A month's free units are its free-quota counter (uses wholly free included)."""
    first, _ = month_bounds(start, tz.key)
    counters = await sql.fetch(
        "SELECT process_type, period_start, used FROM free_quota_usage "
        "WHERE account_id = ? AND period_start >= ? AND period_start < ? AND used > 0",
        account.id,
        first,
        end,
    )
    monthly: dict[tuple[datetime, ProcessType], int] = defaultdict(int)
    for row in counters:
        at = row["period_start"]
        if isinstance(at, str):
            at = datetime.fromisoformat(at)
        monthly[(at.astimezone(UTC), ProcessType(row["process_type"]))] += int(row["used"])
    for (at, pt), used in monthly.items():
        found = buckets.get((at, pt))
        if found is None:
            found = buckets[(at, pt)] = UsageBucket(at, pt)
        # The ledger saw only the partly free uses: the rest were wholly free.
        found.units += max(0, used - found.free_units)
        found.free_units = used


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
