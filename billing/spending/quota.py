"""Monthly free quotas (calendar month in the account's time zone)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from billing import sql
from billing.enums import BillingMode, ProcessType
from billing.models import Account, FreeQuotaUsage
from billing.pricing import PriceBook


def month_bounds(at: datetime, timezone: str) -> tuple[datetime, datetime]:
    """The calendar month containing ``at`` in ``timezone``, as UTC datetimes [start, end)."""
    tz = ZoneInfo(timezone)
    local = at.astimezone(tz)
    start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start.astimezone(UTC), end.astimezone(UTC)


async def take_free_units(
    account_id: str, timezone: str, process_type: ProcessType, quantity: int, allowance: int
) -> int:
    """Use up to ``quantity`` of this month's free units; returns how many were free."""
    if allowance <= 0:
        return 0
    period_start, _ = month_bounds(sql.now(), timezone)
    conn = sql.connection()
    start = period_start
    await sql.execute(
        "INSERT INTO free_quota_usage (account_id, process_type, period_start, used) "
        "VALUES (?, ?, ?, 0) ON CONFLICT (account_id, process_type, period_start) DO NOTHING",
        account_id,
        process_type.value,
        start,
    )
    lock = " FOR UPDATE" if sql.is_postgres(conn) else ""
    rows = await sql.fetch(
        "SELECT id, used FROM free_quota_usage "
        f"WHERE account_id = ? AND process_type = ? AND period_start = ?{lock}",
        account_id,
        process_type.value,
        start,
    )
    used = int(rows[0]["used"])
    free = max(0, min(quantity, allowance - used))
    if free:
        await sql.execute(
            "UPDATE free_quota_usage SET used = used + ? WHERE id = ?", free, rows[0]["id"]
        )
    return free


@dataclass(frozen=True, slots=True)
class QuotaStatus:
    process_type: ProcessType
    allowance: int
    used: int
    period_start: datetime
    period_end: datetime


async def quota_status(account: Account, book: PriceBook) -> list[QuotaStatus]:
    start, end = month_bounds(sql.now(), account.timezone)
    usage = {
        row.process_type: row.used
        for row in await FreeQuotaUsage.filter(account_id=account.id, period_start=start)
    }
    return [
        QuotaStatus(
            price.process_type,
            price.free_monthly_quota or 0,
            usage.get(price.process_type, 0),
            start,
            end,
        )
        for price in book.processes
        if price.billing is BillingMode.FREE_QUOTA_THEN_PREPAID
    ]
